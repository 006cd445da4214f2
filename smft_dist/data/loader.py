"""Batches of MDS samples (schema: smft_dist.data.mds) through mosaicml-streaming, resumable.

    loader = build_dataloader("data/syn/pretrain", 32, shuffle=True, seed=0, rank=r, world_size=w)
    loader.load_state_dict(saved)            # optional: resume where a checkpoint left off
    batches = forever(loader)                # loops over epochs; the trainer takes N steps
    batch = next(batches)                    # input_ids/attention_mask/labels: (B, L) int64
    saved = loader.state_dict()              # a small dict: epoch, global sample position, dataset id

Ranks read disjoint parts of each epoch (streaming partitions the sample space over the ranks in
RANK/WORLD_SIZE); without shuffling, step s of the whole world covers global samples
[s*B*W, (s+1)*B*W), so a fact's 64 paraphrases written consecutively form one global batch when
B*W = 64.

Shared memory: streaming names its /dev/shm blocks with the first free integer prefix, found by
scanning. Two processes constructing datasets at the same moment can pick the same prefix; a file
lock held by each node's local leader around construction serialises that scan across processes.
`clean_stale_shared_memory()` unlinks every streaming block on the node, including live ones of
other jobs: call `clean_stale_shm()` only at the start of a job that has the node to itself.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from smft_dist.data.streaming_compat import import_streaming
from smft_dist.errors import UserError

LOCK_PATH = Path(tempfile.gettempdir()) / "smft_streaming_shm.lock"


class DataError(UserError, ValueError):
    """Bad data path or settings: the message names the problem and the fix."""


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """MDS samples -> input_ids, attention_mask, labels (B, L) int64; labels are input_ids with -100
    where loss_mask or attention_mask is 0 (the model shifts them by one itself)."""
    ids_BL = torch.from_numpy(np.stack([s["input_ids"] for s in samples]).astype(np.int64))
    attn_BL = torch.from_numpy(np.stack([s["attention_mask"] for s in samples]).astype(np.int64))
    loss_BL = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]).astype(bool))
    batch = {"input_ids": ids_BL, "attention_mask": attn_BL,
             "labels": ids_BL.masked_fill(~loss_BL | (attn_BL == 0), -100)}
    if "group" in samples[0]:
        batch["group"] = torch.tensor([int(s["group"]) for s in samples])
    return batch


def _check_env(rank: int, world_size: int) -> None:
    """streaming reads RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE from the environment: fill the
    missing ones and refuse contradictions (DeepSpeed's launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE)."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside world_size {world_size}")
    for key, want in (("RANK", rank), ("WORLD_SIZE", world_size)):
        have = os.environ.setdefault(key, str(want))
        if int(have) != want:
            raise DataError(f"env {key}={have} but build_dataloader got {key.lower()}={want}: pass the launcher's values")
    launcher_local, local = os.environ.get("LOCAL_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if launcher_local is not None and local is not None and launcher_local != local:
        # A LOCAL_WORLD_SIZE the DeepSpeed launcher did not set, inherited from the shell or job
        # that started it (an in-process run sets it to 1): streaming would make every rank a local
        # leader, and two leaders register the same shared memory ("File exists").
        raise DataError(f"env LOCAL_WORLD_SIZE={local} but the DeepSpeed launcher's LOCAL_SIZE={launcher_local}: "
                        f"LOCAL_WORLD_SIZE is left over from the environment the launcher started in; unset it "
                        f"(and RANK, WORLD_SIZE, LOCAL_RANK) before launching")
    if local is None:
        local = launcher_local or (str(world_size) if "LOCAL_RANK" not in os.environ else None)
        if local is None:
            raise DataError("LOCAL_WORLD_SIZE is not set: launch with torchrun/deepspeed or set it to the ranks per node")
        os.environ["LOCAL_WORLD_SIZE"] = local
    os.environ.setdefault("LOCAL_RANK", str(rank % int(local)))
    if not 0 <= int(os.environ["LOCAL_RANK"]) < int(local) or world_size % int(local):
        raise DataError(f"env LOCAL_RANK={os.environ['LOCAL_RANK']}, LOCAL_WORLD_SIZE={local} with world size "
                        f"{world_size}: the local rank must be below the ranks per node, which must divide the world; "
                        f"one of them is left over from the environment the launcher started in")
    if world_size > 1 and not dist.is_initialized():
        raise DataError(f"world_size={world_size} but torch.distributed is not initialised: init the process group first")


@contextmanager
def _prefix_lock(timeout_s: float = 120.0):
    """Serialise streaming's shared-memory prefix registration among this node's processes.

    The node's local leader takes a file lock, then a barrier lets the other local ranks scan for
    the prefix: every scan of this job happens while no other job can register one."""
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    with open(LOCK_PATH, "a") as f:
        deadline = time.monotonic() + timeout_s
        locked = False
        while leader and not locked:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:  # a stuck peer: fall back to streaming's own scan
                    break
                time.sleep(0.05)
        if dist.is_initialized():
            dist.barrier()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def clean_stale_shm() -> None:
    """Unlink leaked streaming shared memory on this node (call on all ranks, once, at job start,
    only if no other streaming job runs on the node)."""
    streaming = import_streaming()
    with _prefix_lock():
        streaming.base.util.clean_stale_shared_memory()


def _local_and_remote(path: str, local_cache: str | None) -> tuple[str, str | None]:
    if "://" not in path:
        p = Path(path)
        if not (p / "index.json").is_file():
            what = "does not exist" if not p.exists() else "has no MDS index.json"
            raise DataError(f"data path {p} {what}: write shards with `smft-data` (synthetic or convert)")
        return str(p.resolve()), None
    # Remote: every local rank of a node must use the same cache folder; derive it from the URI.
    cache = local_cache or os.path.join(tempfile.gettempdir(), "smft_streaming",
                                        hashlib.sha1(path.encode()).hexdigest()[:16])
    return cache, path


def build_dataloader(path: str, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int,
                     local_cache: str | None = None, drop_last: bool = True, num_workers: int = 0):
    """A `StreamingDataLoader` over the MDS folder or URI `path`: one epoch per iteration, `batch_size`
    samples per rank, collated by `collate`; `state_dict()`/`load_state_dict()` resume exactly."""
    streaming = import_streaming()
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be >= 1")
    _check_env(rank, world_size)
    local, remote = _local_and_remote(str(path), local_cache)
    try:
        with _prefix_lock():
            # num_canonical_nodes: shuffled, streaming's own default (the physical node count); it
            # is saved in state_dict() for resharded resumes. Unshuffled, 1: with one canonical node
            # per physical node each node reads its own contiguous block of the data, so global step
            # s would hold samples of both halves (two facts on two nodes); with 1, step s holds the
            # global samples [s*B*W, (s+1)*B*W) at any node count.
            nodes = world_size // int(os.environ["LOCAL_WORLD_SIZE"])
            ds = streaming.StreamingDataset(local=local, remote=remote, shuffle=shuffle, shuffle_seed=seed,
                                            batch_size=batch_size, num_canonical_nodes=nodes if shuffle else 1)
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise DataError(f"{local} is in use by another (or a crashed) streaming job: pass another "
                            f"local_cache, or call clean_stale_shm() at job start if the node is yours") from e
        raise
    _forget_stale_resume(ds)
    if ds.num_samples == 0:
        raise DataError(f"data path {path} holds no samples: check what wrote it")
    if drop_last and ds.num_samples < batch_size * world_size:
        raise DataError(f"{path}: {ds.num_samples} samples < batch_size {batch_size} x world {world_size}: "
                        f"no full batch; lower batch_size or pass drop_last=False")
    loader = _fingerprinted_loader_class()(ds, batch_size=batch_size, collate_fn=collate, drop_last=drop_last,
                                           num_workers=num_workers, persistent_workers=False)
    loader.dataset_id = {"path": str(path), "fingerprint": dataset_fingerprint(Path(local) / "index.json")}
    return loader


def dataset_fingerprint(index_json: str | Path) -> str:
    """A dataset's identity: the SHA-256 (first 16 hex digits) of its MDS index.json, which lists
    every shard with its size and, as `smft-data` writes them, a hash of its bytes: it changes
    whenever the samples do. (An index written without shard hashes identifies only the shard
    names and sizes.)"""
    return hashlib.sha256(Path(index_json).read_bytes()).hexdigest()[:16]


@functools.cache
def _fingerprinted_loader_class():
    """`StreamingDataLoader` whose saved position names the dataset it is a position in
    (`dataset_id`: path and fingerprint); restoring it onto other data raises `DataError` instead
    of silently skipping or repeating samples. (A subclass made on first use: streaming is imported
    lazily, see streaming_compat.)"""

    class FingerprintedLoader(import_streaming().StreamingDataLoader):
        dataset_id: dict

        def state_dict(self):
            state = super().state_dict()
            return None if state is None else dict(state, dataset=self.dataset_id)

        def load_state_dict(self, obj: dict) -> None:
            obj = dict(obj)
            saved = obj.pop("dataset", None)  # absent in positions saved before fingerprints
            if saved is not None and saved["fingerprint"] != self.dataset_id["fingerprint"]:
                raise DataError(
                    f"the saved data position is in dataset {saved['path']} (index fingerprint {saved['fingerprint']}) "
                    f"but this run reads {self.dataset_id['path']} (fingerprint {self.dataset_id['fingerprint']}): "
                    f"resuming would skip or repeat samples of the new data. Resume with the saved dataset, or start "
                    f"afresh on the new one: a new out_dir with model.init_from=<this run's checkpoints> (or "
                    f"checkpoint.resume=none)")
            super().load_state_dict(obj)

    return FingerprintedLoader


def check_one_group_per_batch(dataset, batch_size: int, world_size: int, grad_accum: int) -> None:
    """Refuse an unshuffled grouped set (one fact's paraphrases per group) whose global batch
    (batch_size x world x grad_accum samples) is not exactly its first group: each step would then
    learn part of a fact, or two. Datasets without a `group` column pass. Reads at most
    max(4 x G, 1024) samples."""
    global_batch = batch_size * world_size * grad_accum
    if dataset.num_samples == 0 or "group" not in dataset[0]:
        return
    first, size, cap = int(dataset[0]["group"]), 1, min(max(4 * global_batch, 1024), dataset.num_samples)
    while size < cap and int(dataset[size]["group"]) == first:
        size += 1
    if size != global_batch:
        held = f"at least {size}" if size == cap < dataset.num_samples else str(size)
        raise DataError(
            f"the finetune set's first group holds {held} samples (one fact's paraphrases) but a global batch is "
            f"data.batch_size {batch_size} x world {world_size} x optim.grad_accum {grad_accum} = {global_batch}: "
            f"make the product the group size so that every step is one fact, or set data.one_group_per_batch=false")


def _forget_stale_resume(ds) -> None:
    """Drop a `<prefix>_resume` block that a killed job left under this dataset's prefix.

    Streaming reuses the first prefix whose blocks are gone, but a SIGKILLed job leaves its resume
    block behind, and a new dataset that gets the prefix would silently start from that old
    position. A real resume comes afterwards, through `load_state_dict`. Collective: the barrier
    keeps every local rank's unlink before any rank's `load_state_dict`."""
    from multiprocessing import shared_memory

    try:
        stale = shared_memory.SharedMemory(name=f"{ds._shm_prefix_int:06}_resume")
        stale.close()
        stale.unlink()
    except FileNotFoundError:
        pass
    if dist.is_initialized():
        dist.barrier()


def forever(loader) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches epoch after epoch; `loader.state_dict()` stays valid between any two batches."""
    empty = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        empty = empty + 1 if n == 0 else 0
        if empty == 2:  # one empty epoch is a resume exactly at an epoch end; two is no data
            raise DataError("the data loader yields no batches: the dataset is smaller than one global batch")
