"""The update ledger: every sparse-memory step's rows, before and after, append-only per rank.

Shape legend: U rows of a table this rank updated this step (its share of the global top t),
D value dim.

Layout of ``<out_dir>/ledger/`` (one writer per file, never rewritten in place):

    ledger.json                  the model config, memory layer names, rows, value dim and dtype
    rank<r>of<W>.records         step records, appended: each a safetensors blob holding, per
                                 memory layer, `<layer>.ids` int64 [U] (global row ids),
                                 `<layer>.before` and `<layer>.after` [U, D] (the table's dtype),
                                 and in its metadata the step, the batch's group ids and a
                                 sha256 of its input_ids
    rank<r>of<W>.index           one fixed-size entry per record: (step, offset, length, crc32)

Writing: the training thread only captures the step's rows (device-to-host copies started
non-blocking into pinned buffers on CUDA, plain gathers on the CPU) and hands the step to this
rank's writer thread through a queue of at most `QUEUE_STEPS` steps; the writer serialises and
appends it. The step waits only when the writer is that many steps behind, so the ledger holds at
most QUEUE_STEPS + 2 steps' rows in host memory (the step being captured, the queued ones and the
one being written). An error of the writer is raised on the training thread at its next record,
`sync` or `close`.

Crash safety: a record is written (flushed to the OS, and with `fsync="step"` made durable) before
its index entry, so the index never names bytes that are not there; a killed process leaves at
most a partial record past the last entry and a partial entry, both ignored by readers and cut off
when the run resumes. A step is *complete* when all W files of its writer layout hold it; readers
only see complete steps. Ranks write their own rows (data-parallel replicas of a shard write only
their batch's identity), so the per-step cost is O(t x D), never O(slots), and there are no
collectives.

Durability (`ledger.fsync`, docs/patches.md): `sync()` waits for the writer and fsyncs both files;
the checkpointer calls it before a checkpoint is written, so every step up to a checkpoint is
durable before the checkpoint exists, and `close()` (at the end of a run) does the same.
"checkpoint" (the default) fsyncs only there; "step" also fsyncs every record, then its entry, as
the writer appends them.

Resume: `Ledger.open(..., step=S)` truncates every file to the steps <= S (a killed run may have
recorded steps after its last checkpoint; they are recorded again, once, as they are redone).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import re
import struct
import threading
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from smft_dist.errors import UserError

FORMAT = "smft-ledger/1"
FSYNC_MODES = ("checkpoint", "step")  # ledger.fsync: when records are made durable (module docstring)
QUEUE_STEPS = 2  # steps handed to the writer and not yet written before a step waits for it
META = "ledger.json"
_ENTRY = struct.Struct("<qQQI")  # step, offset, length, crc32 of the record bytes
_FILE = re.compile(r"rank(\d+)of(\d+)\.index")


class LedgerError(UserError, RuntimeError):
    pass


@dataclass
class RowUpdate:
    """One table's rows in one step: ids_U (global, sorted), before_UD, after_UD."""

    ids: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor


@dataclass
class StepRecord:
    """What one step did, over every rank: its rows per memory layer and its data."""

    step: int
    groups: list[int] = field(default_factory=list)  # sorted group ids of the global batch (e.g. fact ids)
    batch_sha256: list[str] = field(default_factory=list)  # one per rank, in rank order
    layers: dict[str, RowUpdate] = field(default_factory=dict)


def batch_identity(micro_batches: list[dict] | dict) -> tuple[list[int], str]:
    """-> (sorted group ids in this rank's batch, sha256 of its input_ids), over every
    micro-batch. Groups come from MDS's optional `group` column (the fact a paraphrase belongs to)."""
    h, groups = hashlib.sha256(), set()
    for batch in micro_batches if isinstance(micro_batches, list) else [micro_batches]:
        ids = batch["input_ids"].detach().to("cpu", torch.int64).contiguous()
        h.update(str(tuple(ids.shape)).encode() + ids.numpy().tobytes())
        if "group" in batch:
            groups.update(int(g) for g in batch["group"].tolist())
    return sorted(groups), h.hexdigest()


def _read_entries(index: Path, records_size: int) -> list[tuple[int, int, int, int]]:
    """The whole entries of an index whose record bytes are all present."""
    data = index.read_bytes()
    n = len(data) // _ENTRY.size  # a partial trailing entry (killed mid-write) is ignored
    entries = [_ENTRY.unpack_from(data, i * _ENTRY.size) for i in range(n)]
    return [e for e in entries if e[1] + e[2] <= records_size]


@dataclass
class _Capture:
    """One step's rows on their way to the host, per memory layer: ids_T (every selected id), own_T
    (which of them this rank writes), before_TD, after_TD (clamped gathers: rows of other ranks'
    ids are garbage, dropped by `own` on the writer). Filtering on the writer keeps the training
    thread free of host syncs, at t x D instead of U x D copied bytes."""

    step: int
    identity: tuple[list[int], str]
    ids: list[torch.Tensor]
    own: list[torch.Tensor]
    before: list[torch.Tensor]
    after: list[torch.Tensor] = field(default_factory=list)
    copied: Optional[torch.cuda.Event] = None  # the non-blocking copies are done when it is

    def tensors(self, names: Sequence[str]) -> dict:
        if self.copied is not None:
            self.copied.synchronize()
        out = {}
        for name, ids, own, before, after in zip(names, self.ids, self.own, self.before, self.after):
            out[f"{name}.ids"], out[f"{name}.before"], out[f"{name}.after"] = ids[own], before[own], after[own]
        return out


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A host copy of `x`: started non-blocking into pinned memory from CUDA (complete once the
    step's `_Capture.copied` event is), the tensor itself on the CPU (a fresh gather already)."""
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


class Ledger:
    """The writer of one rank. `begin_step(batch)` at the start of every train step, then
    `with ledger.recording(tables, selected): optimizer.step(selected)` around the memory update;
    `sync()` before a checkpoint, `close()` at the end."""

    def __init__(self, root: Path, rank: int, world_size: int, names: Sequence[str], writes_rows: bool,
                 step: int, fsync: str):
        if fsync not in FSYNC_MODES:
            raise LedgerError(f"ledger.fsync={fsync!r} is not one of {list(FSYNC_MODES)}")
        self.root, self.names, self.writes_rows, self.fsync = Path(root), list(names), writes_rows, fsync
        self.rank, self.step = rank, step
        stem = self.root / f"rank{rank}of{world_size}"
        self._records = open(stem.with_suffix(".records"), "ab")
        self._index = open(stem.with_suffix(".index"), "ab")
        self._identity: tuple[list[int], str] = ([], "")
        self.bytes_written = 0
        self.write_s = 0.0  # the writer thread's time: serialising, writing and (fsync="step") fsyncing
        self._queue: queue.Queue[Optional[_Capture]] = queue.Queue(maxsize=QUEUE_STEPS)
        self._error: Optional[tuple[int, BaseException]] = None  # (step, what) of the writer's first failure
        self._writer = threading.Thread(target=self._write_loop, name=f"smft-ledger-rank{rank}", daemon=True)
        self._writer.start()
        atexit.register(self.close)  # a daemon thread dies with the interpreter: drain it first

    @classmethod
    def open(cls, root: str | os.PathLike, *, rank: int, world_size: int, names: Sequence[str], meta: dict,
             writes_rows: bool = True, step: int = 0, fsync: str = "checkpoint") -> "Ledger":
        """Open rank `rank`'s files for appending, cut at `step` (the step the run starts or
        resumes at). Rank 0 writes `ledger.json` and cuts the files of other writer layouts (an
        earlier world size); each rank cuts its own, so no two processes touch one file."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            tmp = root / (META + ".tmp")
            tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=1, default=str))
            os.replace(tmp, root / META)
        for index in root.glob("rank*of*.index"):
            r, w = map(int, _FILE.fullmatch(index.name).groups())
            if (r, w) == (rank, world_size) or (rank == 0 and w != world_size):
                truncate_files(index, step)
        own = root / f"rank{rank}of{world_size}.index"
        if not own.exists():
            truncate_files(own, step)  # creates both files empty
        return cls(root, rank, world_size, names, writes_rows, step, fsync)

    def begin_step(self, micro_batches: list[dict] | dict) -> None:
        """Count the step (skipped steps too: the numbering follows the training loop's) and note
        the batch's identity; call before the batch is moved to the device (that drops `group`)."""
        with torch.profiler.record_function("smft/ledger"):
            self.step += 1
            self._identity = batch_identity(micro_batches)

    @contextmanager
    def recording(self, tables: Sequence, selected: Sequence[torch.Tensor]):
        """Capture this rank's selected rows before the body (the optimizer step) and after it,
        then hand the step to the writer. O(t x D) device gathers and copies, no host sync."""
        self._raise_writer_error()
        with torch.profiler.record_function("smft/ledger"):
            rec = _Capture(self.step, self._identity, [], [], [])
            local = []
            for table, ids in zip(tables, selected):
                ids = ids.to(table.weight.device)
                n = table.row_end - table.row_start
                if not self.writes_rows or n == 0:  # a replica writes only its batch's identity
                    ids = ids[:0]
                at = ids - table.row_start
                local.append(at.clamp(0, max(n - 1, 0)))
                rec.ids.append(_to_host(ids) if ids.is_cuda else ids.clone())  # the caller's may be reused
                rec.own.append(_to_host((at >= 0) & (at < n)))
                rec.before.append(_to_host(table.weight.detach()[local[-1]]))
        yield
        with torch.profiler.record_function("smft/ledger"):
            rec.after = [_to_host(t.weight.detach()[at]) for t, at in zip(tables, local)]
            if any(t.weight.is_cuda for t in tables):
                rec.copied = torch.cuda.Event()
                rec.copied.record()
            self._put(rec)

    def _put(self, rec: _Capture) -> None:
        while True:  # blocks while the writer is QUEUE_STEPS behind, unless it died meanwhile
            self._raise_writer_error()
            try:
                return self._queue.put(rec, timeout=1.0)
            except queue.Full:
                continue

    def _write_loop(self) -> None:
        while (rec := self._queue.get()) is not None:
            try:
                if self._error is None:  # after a failure the rest is drained unwritten
                    t0 = time.perf_counter()
                    groups, digest = rec.identity
                    self.append(rec.step, rec.tensors(self.names),
                                {"step": str(rec.step), "groups": json.dumps(groups), "batch_sha256": digest})
                    self.write_s += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 (raised on the training thread)
                self._error = (rec.step, e)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            step, e = self._error
            raise LedgerError(f"the ledger writer of rank {self.rank} failed at step {step} in {self.root}: "
                              f"{type(e).__name__}: {e}; free or fix that folder (ledger.dir) and resume, or set "
                              f"ledger.enabled=false") from e

    def append(self, step: int, tensors: dict, metadata: dict) -> None:
        """Serialise one record and append it, then its index entry (on the writer thread)."""
        blob = st_save(tensors, metadata=metadata)
        offset = self._records.tell()
        self._records.write(blob)
        self._records.flush()
        if self.fsync == "step":
            os.fsync(self._records.fileno())  # the record is durable before the index names it
        self._index.write(_ENTRY.pack(step, offset, len(blob), zlib.crc32(blob)))
        self._index.flush()
        if self.fsync == "step":
            os.fsync(self._index.fileno())
        self.bytes_written += len(blob) + _ENTRY.size

    def wait(self) -> None:
        """Block until every step handed over is written (to the OS, not necessarily durable)."""
        self._queue.join()
        self._raise_writer_error()

    def sync(self) -> None:
        """Every step handed over written and durable (records before the index); a no-op once closed."""
        if self._records.closed:
            return
        self.wait()
        os.fsync(self._records.fileno())
        os.fsync(self._index.fileno())

    def close(self) -> None:
        """Drain the writer, make everything durable and close the files; raises a writer error."""
        if self._records.closed:
            return
        atexit.unregister(self.close)
        self._queue.put(None)
        self._writer.join()
        if self._error is None:
            os.fsync(self._records.fileno())
            os.fsync(self._index.fileno())
        for f in (self._records, self._index):
            try:
                f.close()
            except OSError:
                if self._error is None:
                    raise  # else what failed the writer (still buffered) failed again: raised below
        self._raise_writer_error()


def truncate_files(index: Path, step: int) -> None:
    """Keep the entries of steps <= `step` of one writer (and their record bytes); drop the rest,
    including a partial record or entry a killed process left behind."""
    records = index.with_suffix(".records")
    if not index.exists():
        index.write_bytes(b"")
        records.write_bytes(b"")
        return
    size = records.stat().st_size if records.exists() else 0
    keep = [e for e in _read_entries(index, size) if e[0] <= step]
    end = max((e[1] + e[2] for e in keep), default=0)
    with open(records, "ab") as f:
        f.truncate(end)
    with open(index, "ab") as f:
        f.truncate(len(keep) * _ENTRY.size)


@contextmanager
def recording(ledger: Optional[Ledger], tables: Sequence, selected):
    """`ledger.recording(...)`, or nothing when there is no ledger (or nothing was selected)."""
    with ledger.recording(tables, selected) if ledger is not None and selected is not None else nullcontext():
        yield


def read_meta(root: str | os.PathLike) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise LedgerError(f"{root} holds no ledger ({META} is missing): pass a sparse-memory finetune's out_dir "
                          "or its ledger/ folder (the ledger is written when ledger.enabled=true, the default)")
    return json.loads(path.read_text())


def complete_steps(root: str | os.PathLike) -> dict[int, list[tuple[Path, int, int, int]]]:
    """-> {step: [(records file, offset, length, crc), one per rank of its layout]} for every
    step that all ranks of its writer layout recorded. Partial steps (a killed run) are left out."""
    root = Path(root)
    layouts: dict[int, dict[int, Path]] = {}
    for index in root.glob("rank*of*.index"):
        r, w = map(int, _FILE.fullmatch(index.name).groups())
        layouts.setdefault(w, {})[r] = index
    steps = {}
    for w, files in layouts.items():
        if set(files) != set(range(w)):
            continue  # a rank never opened its files: no step of this layout is complete
        per_rank = []
        for r in range(w):
            records = files[r].with_suffix(".records")
            per_rank.append({e[0]: (records, e[1], e[2], e[3]) for e in _read_entries(files[r], records.stat().st_size)})
        for s in set.intersection(*(set(p) for p in per_rank)):
            steps[s] = [p[s] for p in per_rank]
    return dict(sorted(steps.items()))


def read_step(step: int, parts: list[tuple[Path, int, int, int]], names: Sequence[str]) -> StepRecord:
    """Merge one step's per-rank records into a `StepRecord` (rows sorted by global id)."""
    rec = StepRecord(step)
    ranks: list[dict] = []
    groups: set[int] = set()
    for path, offset, length, crc in parts:
        with open(path, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        if zlib.crc32(blob) != crc:
            raise LedgerError(f"{path}: the record of step {step} at byte {offset} is corrupt (crc mismatch)")
        ranks.append(st_load(blob))
        meta = _blob_metadata(blob)
        groups.update(json.loads(meta["groups"]))
        rec.batch_sha256.append(meta["batch_sha256"])
    rec.groups = sorted(groups)
    for n in names:
        ids_U = torch.cat([r[f"{n}.ids"] for r in ranks])
        order = torch.argsort(ids_U)
        rec.layers[n] = RowUpdate(ids_U[order], torch.cat([r[f"{n}.before"] for r in ranks])[order],
                                  torch.cat([r[f"{n}.after"] for r in ranks])[order])
    return rec


def _blob_metadata(blob: bytes) -> dict:
    n = struct.unpack_from("<Q", blob)[0]
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


def open_run_ledger(cfg, ctx, names: Sequence[str], step: int) -> Optional[Ledger]:
    """The ledger of a run (`RunConfig`, `DistContext`) resuming at `step`: sparse memory
    finetuning with `ledger.enabled` only (else None)."""
    if not (cfg.mode == "finetune" and cfg.method == "sparse_memory" and cfg.ledger.enabled):
        return None
    from omegaconf import OmegaConf

    m = cfg.model
    meta = {"model": OmegaConf.to_container(OmegaConf.structured(m)), "layers": list(names),
            "num_rows": m.memory_n_keys ** 2, "dim": m.memory_value_dim, "dtype": m.memory_value_dtype,
            "run": cfg.name, "world_size": ctx.world_size, "mp": ctx.mp_size}
    root = Path(cfg.ledger.dir or Path(cfg.out_dir) / "ledger")
    return Ledger.open(root, rank=ctx.rank, world_size=ctx.world_size, names=names, meta=meta,
                       writes_rows=ctx.replicate_rank == 0, step=step, fsync=cfg.ledger.fsync)
