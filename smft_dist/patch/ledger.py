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

Crash safety: a record is written (and, with fsync, made durable) before its index
entry, so the index never names bytes that are not there; a killed process leaves at most a
partial record past the last entry and a partial entry, both ignored by readers and cut off when
the run resumes. A step is *complete* when all W files of its writer layout hold it; readers only
see complete steps. Ranks write their own rows (data-parallel replicas of a shard write only their
batch's identity), so the per-step cost is O(t x D), never O(slots), and there are no collectives.

Resume: `Ledger.open(..., step=S)` truncates every file to the steps <= S (a killed run may have
recorded steps after its last checkpoint; they are recorded again, once, as they are redone).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
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


class Ledger:
    """The writer of one rank. `begin_step(batch)` at the start of every train step, then
    `with ledger.recording(tables, selected): optimizer.step(selected)` around the memory update."""

    def __init__(self, root: Path, rank: int, world_size: int, names: Sequence[str], writes_rows: bool,
                 step: int, fsync: bool):
        self.root, self.names, self.writes_rows, self.fsync = Path(root), list(names), writes_rows, fsync
        self.step = step
        stem = self.root / f"rank{rank}of{world_size}"
        self._records = open(stem.with_suffix(".records"), "ab")
        self._index = open(stem.with_suffix(".index"), "ab")
        self._identity: tuple[list[int], str] = ([], "")
        self.bytes_written = 0

    @classmethod
    def open(cls, root: str | os.PathLike, *, rank: int, world_size: int, names: Sequence[str], meta: dict,
             writes_rows: bool = True, step: int = 0, fsync: bool = True) -> "Ledger":
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
        self.step += 1
        self._identity = batch_identity(micro_batches)

    @contextmanager
    def recording(self, tables: Sequence, selected: Sequence[torch.Tensor]):
        """Capture this rank's selected rows before the body (the optimizer step) and after it,
        then append the step's record. O(U x D) copies."""
        own_U = []
        for table, ids in zip(tables, selected):
            ids = ids.to(table.weight.device)
            own_U.append(ids[(ids >= table.row_start) & (ids < table.row_end)] if self.writes_rows else ids[:0])
        before = [t.weight.detach()[ids - t.row_start].cpu() for t, ids in zip(tables, own_U)]
        yield
        tensors = {}
        for name, table, ids, b in zip(self.names, tables, own_U, before):
            tensors[f"{name}.ids"] = ids.cpu()
            tensors[f"{name}.before"] = b
            tensors[f"{name}.after"] = table.weight.detach()[ids - table.row_start].cpu()
        groups, digest = self._identity
        self.append(self.step, tensors, {"step": str(self.step), "groups": json.dumps(groups), "batch_sha256": digest})

    def append(self, step: int, tensors: dict, metadata: dict) -> None:
        blob = st_save(tensors, metadata=metadata)
        offset = self._records.tell()
        self._records.write(blob)
        self._records.flush()
        if self.fsync:
            os.fsync(self._records.fileno())  # the record is durable before the index names it
        self._index.write(_ENTRY.pack(step, offset, len(blob), zlib.crc32(blob)))
        self._index.flush()
        if self.fsync:
            os.fsync(self._index.fileno())
        self.bytes_written += len(blob) + _ENTRY.size

    def close(self) -> None:
        self._records.close()
        self._index.close()


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
