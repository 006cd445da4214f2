"""The checkpoint's files: where each part of a run lives in ``step_<N>/``, the manifest, and
reading and writing the memory shards, dense weights and row-sparse optimizer state.

Below both the trainer (train/checkpoint.py's `Checkpointer` writes and resumes runs) and the tools
that read or edit a checkpoint without training (smft-export, smft-eval, smft-patch), so that each
of them imports it downward.

Layout of ``<checkpoint.dir>/step_<N>/`` (docs/design.md §6):

    meta.json                 step, world, mp, the run config; written last: its presence = complete
    manifest.json             byte size and sha256 of every other file, verified at load
    dense.safetensors         full dense weights (everything but the memory values), rank 0
    memory/<layer>.rows_<a>_<b>.safetensors   rows [a, b) of a memory table, one file per mp rank
    memory_optim/rows_<a>_<b>.safetensors     row-sparse optimizer state of rows [a, b), sorted by global id
    df/<layer>.safetensors    the background df of each memory layer
    dense_optim.pt | deepspeed/ | fsdp_optim/   the dense engine's optimizer and schedule
    data.json                 the global data position (streaming's state is global, not per rank)
    rng_rank<r>.pt            RNG of each rank

Memory rows and their optimizer state are resharded on load: a rank reads only its own rows of
the files that overlap them. Both stream in row blocks (`BLOCK_BYTES`): a save or load adds one
block of host memory, not a shard, and a save hashes the bytes it writes, so the manifest reads
none of those files again.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from smft_dist.config import ConfigError
from smft_dist.errors import UserError, reason
from smft_dist.memory.values import ValueTable
from smft_dist.optim.sparse import merge_state_dicts

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"step_(\d+)")


class CheckpointError(UserError, RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ----- finding steps -----
def complete_steps(root: Path) -> list[int]:
    """Steps under `root` that have a meta.json, oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := STEP_RE.fullmatch(p.name)) and (p / "meta.json").is_file())


def _named_by_latest(root: Path) -> Optional[Path]:
    """The folder `root/latest` names; `step_N.old` when a re-save of step N died between moving
    the old folder aside and renaming the new one into place."""
    if not (root / LATEST).is_file():
        return None
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, ValueError) as e:  # not UTF-8 text
        raise CheckpointError(f"{root / LATEST} is unreadable ({reason(e)}): it should hold a step folder's name; "
                              f"write the name of an intact step_<N> folder beside it into it") from None
    if not STEP_RE.fullmatch(name):
        raise CheckpointError(f"{root / LATEST} holds {name[:60]!r}, not a step folder's name (step_<N>): write the "
                              f"name of an intact step_<N> folder beside it into it")
    for cand in (root / name, root / f"{name}.old"):
        if (cand / "meta.json").is_file():
            return cand
    raise CheckpointError(f"{root / LATEST} names {name}, which is incomplete or missing")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir, or a checkpoint root (-> the step named by its `latest` file)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    named = _named_by_latest(p)
    if named is None:
        raise CheckpointError(f"{p} is not a checkpoint (no meta.json) nor a checkpoint folder (no '{LATEST}' file)")
    return named


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The step named by `root/latest`; None when there is none yet. A `latest` that names a missing
    or incomplete step raises: silently starting afresh would train over a run the user meant to resume."""
    return _named_by_latest(Path(root))


def read_meta(step_dir: Path) -> dict:
    """A step's meta.json: a mapping with the run's `model` section (else a CheckpointError)."""
    path = Path(step_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise CheckpointError(f"{path} is unreadable ({reason(e)}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} is not a checkpoint's meta.json (no model section): the checkpoint is "
                              f"damaged, or the file is another one's")
    return meta


# ----- model shape -----
# model.* keys that change the shape of some weight (memory_knn, for one, does not).
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "memory_layers", "memory_n_keys",
              "memory_heads", "memory_k_dim", "memory_value_dim", "memory_swilu", "memory_mode")


def _shape_value(section: dict, key: str):
    """`section[key]` with the Llama defaults spelled out (None kv heads: one per head; None
    head_dim: hidden_size // heads), so a config and a saved HF config compare equal."""
    if key == "num_key_value_heads":
        return section.get(key) or section.get("num_attention_heads")
    if key == "head_dim":
        return section.get(key) or section["hidden_size"] // section["num_attention_heads"]
    return section[key]


def check_model_matches(model_cfg, have: dict, where) -> None:
    """`have`: the model config saved with the weights at `where` (HF config or checkpoint meta)."""
    want_section = asdict(model_cfg)
    for key in SHAPE_KEYS:
        if key not in have:  # a checkpoint written before the key existed
            continue
        want, got = _shape_value(want_section, key), _shape_value(have, key)
        if want != got:
            raise ConfigError(f"model.{key}={want} but {where} holds a model with {key}={got}: the config "
                              f"and the weights are of different models (fix model.{key}, model.init_from or "
                              f"checkpoint.resume; a folder written by smft-retrofit holds its model section in "
                              f"model.yaml: pass --config <folder>/model.yaml first)")


# ----- integrity -----
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


# ----- streamed safetensors files -----
# Memory shards and row-state files are written and read in row blocks of at most BLOCK_BYTES:
# the host memory a save or load adds is one block (a reused host buffer when writing; when
# reading, a block's dtype conversion, the rows themselves being views of the file's mmap), not a
# shard, so a shard as large as host memory still checkpoints.
BLOCK_BYTES = 64 << 20
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32"}
_FROM_ST_DTYPE = {v: k for k, v in _ST_DTYPES.items()}


def _block_rows(row_bytes: int, block_bytes: int) -> int:
    """Rows per block: as many as fit `block_bytes`, at least one (a row is never split)."""
    return max(1, block_bytes // max(row_bytes, 1))


class _HashingWriter:
    """A file written front to back whose sha256 and size are kept as the bytes go out, so the
    manifest entry of the file needs no second read of it."""

    def __init__(self, file):
        self.file, self.sha, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def entry(self) -> dict:
        """-> the manifest entry {"bytes", "sha256"} of what was written."""
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def _save_streamed(path: Path, tensors: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]], metadata: dict,
                   block_bytes: int) -> dict:
    """Write a safetensors file (8-byte little-endian header length, JSON header of dtype, shape
    and data_offsets, space-padded to 8 bytes, then the raw little-endian bytes) from `tensors`:
    name -> (source_SX on any device, order_S or None), stored as source_SX[order_S]. Rows go
    out block by block through one reused host buffer; a block's gather (`source[order[a:b]]`)
    stays on the source's device. -> the file's manifest entry {"bytes", "sha256"}.

    Tensors are laid out by decreasing element size, as safetensors' own writer does, so that each
    starts aligned to its element size."""
    names = sorted(tensors, key=lambda k: (-tensors[k][0].element_size(), k))
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for k in names:
        src = tensors[k][0]
        nbytes = src.numel() * src.element_size()
        header[k] = {"dtype": _ST_DTYPES[src.dtype], "shape": list(src.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    row_bytes = {k: math.prod(tensors[k][0].shape[1:]) * tensors[k][0].element_size() for k in names}
    buf_bytes = max([_block_rows(row_bytes[k], block_bytes) * row_bytes[k] for k in names], default=0)
    on_cuda = any(tensors[k][0].is_cuda for k in names)
    host_B = torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=on_cuda)  # the one host buffer
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        out.write(len(head).to_bytes(8, "little") + head)
        for k in names:
            src, order = tensors[k]
            step = _block_rows(row_bytes[k], block_bytes)
            for a in range(0, src.shape[0], step):
                rows = src[a:a + step] if order is None else src[order[a:a + step]]
                n = rows.numel() * rows.element_size()
                host_B[:n].view(src.dtype).view(rows.shape).copy_(rows)
                out.write(memoryview(host_B[:n].numpy()))
    return out.entry()


def _read_rows_into(sliced, first: int, dest, block_bytes: int) -> None:
    """Copy rows [first, first + len(dest)) of a safetensors slice (`safe_open(...).get_slice`,
    a view of the file's mmap) into `dest` (any device and dtype) block by block: each block
    touches only its rows' pages of the file and allocates at most `block_bytes` (its dtype
    conversion), sized by the larger of a file row and a `dest` row."""
    row_elems = math.prod(dest.shape[1:])
    row_bytes = row_elems * max(_FROM_ST_DTYPE[sliced.get_dtype()].itemsize, dest.element_size())
    step = _block_rows(row_bytes, block_bytes)
    for a in range(0, dest.shape[0], step):
        block = sliced[first + a:first + min(a + step, dest.shape[0])]
        dest[a:a + block.shape[0]] = block.to(dest.dtype)


def _files(step_dir: Path) -> list[str]:
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, "meta.json"))


def _gather_dicts(mine: dict) -> dict:
    """Union of every rank's dict (all_gather_object over the world; the identity without a group)."""
    if not dist.is_initialized():
        return mine
    parts = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in p.items()}


def write_manifest(step_dir: Path, hashed: Optional[dict] = None) -> None:
    """Collective: every rank hashes a 1/world share of the files; rank 0 writes manifest.json.
    `hashed`: this rank's entries {relative path: {"bytes", "sha256"}} computed while writing the
    files (`save_memory`, `save_row_state`): those files are not read again."""
    known = _gather_dicts(hashed or {})
    files = [f for f in _files(step_dir) if f not in known]
    mine = {f: {"bytes": (step_dir / f).stat().st_size, "sha256": _sha256(step_dir / f)}
            for i, f in enumerate(files) if i % _world() == _rank()}
    manifest = {**known, **_gather_dicts(mine)}
    if _rank() == 0:
        (step_dir / MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())), indent=1))


def update_manifest(step_dir: Path, names: list[str]) -> None:
    """Re-hash `names` (paths relative to `step_dir`, changed in place, e.g. by smft-patch) into
    manifest.json; the other entries stay as they were. Check the checkpoint intact first
    (`check_intact`): re-hashing a damaged file would make its damage pass as intact."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    for name in names:
        manifest[name] = {"bytes": (step_dir / name).stat().st_size, "sha256": _sha256(step_dir / name)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(dict(sorted(manifest.items())), indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def verify_checkpoint(step_dir: Path) -> list[str]:
    """-> the problems found (empty: intact). Sizes are checked on every rank, checksums split over
    the ranks (collective when a process group exists)."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{step_dir / MANIFEST} is missing (written by an older smft_dist, or damaged)"]
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        return [f"{step_dir / MANIFEST} is unreadable ({reason(e)})"]
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int)
                                                 and isinstance(v.get("sha256"), str) for v in manifest.values()):
        return [f"{step_dir / MANIFEST} is not a checkpoint manifest ({{file: {{bytes, sha256}}}})"]
    problems = {}
    for i, (name, want) in enumerate(sorted(manifest.items())):
        f = step_dir / name
        if not f.is_file():
            problems[name] = f"{f} is missing"
        elif f.stat().st_size != want["bytes"]:
            problems[name] = f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        elif i % _world() == _rank() and _sha256(f) != want["sha256"]:
            problems[name] = f"{f} does not match its checksum (corrupted)"
    return [v for _, v in sorted(_gather_dicts(problems).items())]


def check_intact(step_dir: Path) -> None:
    """Raise when a file of the checkpoint is missing, truncated or altered (`verify_checkpoint`;
    collective under a process group): what model.init_from, smft-export and smft-patch read."""
    problems = verify_checkpoint(step_dir)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {'; '.join(problems[:3])}: use an intact "
                              f"checkpoint (e.g. an earlier step_<N> folder beside it)")


# ----- memory tables -----
def layer_names(model) -> list[str]:
    return [f"layer{i}" for i in model.config.memory_layers]


def save_memory(tables: list[ValueTable], names: list[str], step_dir: Path,
                block_bytes: int = BLOCK_BYTES) -> dict:
    """Write each table's rows [row_start, row_end) to `memory/<name>.rows_<a>_<b>.safetensors`,
    streamed in blocks of `block_bytes`. -> the manifest entries of the files written
    ({path relative to step_dir: {"bytes", "sha256"}}, for `write_manifest`)."""
    (step_dir / "memory").mkdir(exist_ok=True)
    entries = {}
    for name, t in zip(names, tables):
        rel = f"memory/{name}.rows_{t.row_start}_{t.row_end}.safetensors"
        entries[rel] = _save_streamed(step_dir / rel, {"rows": (t.weight.detach(), None)},
                                      {"num_rows": str(t.num_rows), "dim": str(t.dim)}, block_bytes)
    return entries


def _row_files(folder: Path, pattern: str) -> list[tuple[int, int, Path]]:
    out = []
    for f in sorted(folder.glob(pattern)):
        a, b = map(int, re.search(r"rows_(\d+)_(\d+)", f.name).groups())
        out.append((a, b, f))
    return out


def load_memory(tables: list[ValueTable], names: list[str], step_dir: Path, block_bytes: int = BLOCK_BYTES) -> None:
    """Fill each table's rows [row_start, row_end) from the saved shards, whatever mp they were
    saved at: reads only the overlapping rows of each file, in ranged reads of at most
    `block_bytes` copied straight into the table (O(local rows) read, O(block) host memory)."""
    for name, t in zip(names, tables):
        files = _row_files(step_dir / "memory", f"{name}.rows_*_*.safetensors")
        if not files:
            raise CheckpointError(f"{step_dir}: no memory shards for {name}: the checkpoint is of another model "
                                  f"(memory_layers differ?)")
        filled = 0
        for a, b, f in files:
            lo, hi = max(a, t.row_start), min(b, t.row_end)
            try:
                with safe_open(str(f), framework="pt") as fh:
                    meta = fh.metadata()
                    if int(meta["num_rows"]) != t.num_rows or int(meta["dim"]) != t.dim:
                        raise CheckpointError(
                            f"{f}: memory table is {meta['num_rows']} x {meta['dim']}, the model's is "
                            f"{t.num_rows} x {t.dim}: the checkpoint is of another model shape "
                            f"(memory_n_keys/value_dim)")
                    rows = fh.get_slice("rows")
                    if rows.get_shape() != [b - a, t.dim]:  # rows are copied in blocks: none may be missing
                        raise CheckpointError(f"{f} holds {rows.get_shape()} rows, its name says {[b - a, t.dim]}: "
                                              f"the checkpoint is damaged")
                    if lo < hi:
                        with torch.no_grad():
                            _read_rows_into(rows, lo - a, t.weight[lo - t.row_start:hi - t.row_start], block_bytes)
                        filled += hi - lo
            except (SafetensorError, KeyError) as e:  # KeyError: a dtype no checkpoint writes
                raise CheckpointError(f"{f} is unreadable ({e}): the checkpoint is damaged") from None
        if filled != t.row_end - t.row_start:
            raise CheckpointError(f"{step_dir}: the memory shards of {name} cover {filled} of this rank's "
                                  f"{t.row_end - t.row_start} rows: the checkpoint is incomplete")


def read_dense(module, step_dir: Path) -> dict:
    """The saved dense weights, checked against `module`'s names and shapes (unwrapped or PEFT model)."""
    try:
        state = load_file(str(step_dir / "dense.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{step_dir / 'dense.safetensors'} is unreadable ({e}): the checkpoint is damaged") from None
    own = module.state_dict()
    for k, v in state.items():
        if k not in own:
            raise CheckpointError(f"{step_dir}: weight {k} is not in this model: the checkpoint is of another model")
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{step_dir}: {k} has shape {tuple(v.shape)}, the model's is "
                                  f"{tuple(own[k].shape)}: the checkpoint is of another model shape")
    missing = [k for k in own if k not in state and not k.endswith(".values.weight")]  # add mode: mlp.memory.values
    if missing:
        raise CheckpointError(f"{step_dir}: missing weights {missing[:3]}...: the checkpoint is of another model")
    return state


def load_dense(module, step_dir: Path) -> None:
    """Load dense weights into a model not yet wrapped by an engine; shapes must match exactly."""
    module.load_state_dict(read_dense(module, step_dir), strict=False)


def rows_of(tables: list[ValueTable]) -> tuple[int, int]:
    """(row_start, row_end) shared by every table (one row plan for all memory layers)."""
    layouts = {(t.row_start, t.row_end, t.num_rows) for t in tables}
    if len(layouts) != 1:
        raise CheckpointError(f"memory tables of different row layouts {sorted(layouts)}: one plan is expected")
    start, end, _ = layouts.pop()
    return start, end


# Row-sparse optimizer state, `memory_optim/rows_<a>_<b>.safetensors`: for the i-th memory table
# tensors `<i>.ids` (int64 [S], global row ids, sorted ascending) and `<i>.<state>` ([S, ...], e.g.
# `<i>.exp_avg`, `<i>.master`), metadata {"lr", "tables"}. Sorted ids make the rows of any range
# one slice of every tensor, which safetensors reads alone: a rank resuming at another mp reads
# the rows it owns, not the file.
def save_row_state(state: dict, path: Path, block_bytes: int = BLOCK_BYTES) -> dict:
    """Write a row-sparse optimizer's `state_dict()` ({"lr", "tables": [{"ids": ids_S, name: state_S}]}),
    sorted by id, streamed in blocks of `block_bytes` (the sort's gathers stay on the state's
    device). -> the file's manifest entry {"bytes", "sha256"}."""
    tensors = {}
    for i, table_sd in enumerate(state["tables"]):
        order_S = torch.argsort(table_sd["ids"])
        tensors.update({f"{i}.{k}": (v.detach(), order_S) for k, v in table_sd.items()})
    return _save_streamed(path, tensors, {"lr": repr(float(state["lr"])), "tables": str(len(state["tables"]))},
                          block_bytes)


class _SortedIds:
    """A file's sorted ids as a sequence that `bisect` searches, one element read per probe."""

    def __init__(self, ids_slice):
        self.ids_slice = ids_slice

    def __len__(self) -> int:
        return self.ids_slice.get_shape()[0]

    def __getitem__(self, i: int) -> int:
        return int(self.ids_slice[i:i + 1][0])


def read_row_state(f: Path, lo: int, hi: int, device=None, block_bytes: int = BLOCK_BYTES) -> dict:
    """The state of global rows [lo, hi) in one row-state file, as `save_row_state` takes it, on
    `device` (default: the host). Reads O(log S) ids for the binary search, then the [lo, hi)
    slice of each tensor only, in ranged reads of at most `block_bytes` copied into the result."""
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta, keys = fh.metadata(), list(fh.keys())
            tables = []
            for i in range(int(meta["tables"])):
                ids = _SortedIds(fh.get_slice(f"{i}.ids"))
                first, last = bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)
                names = [k.split(".", 1)[1] for k in keys if k.split(".", 1)[0] == str(i)]
                table = {}
                for k in names:
                    sliced = fh.get_slice(f"{i}.{k}")
                    shape = sliced.get_shape()
                    if shape[0] != len(ids):
                        raise ValueError(f"{i}.{k} has {shape[0]} rows, {i}.ids {len(ids)}")
                    table[k] = torch.empty((last - first, *shape[1:]), device=device,
                                           dtype=_FROM_ST_DTYPE[sliced.get_dtype()])
                    _read_rows_into(sliced, first, table[k], block_bytes)
                tables.append(table)
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable ({type(e).__name__}: {e}): the checkpoint is damaged") from None
    return {"lr": float(meta["lr"]), "tables": tables}


def load_memory_optimizer(optimizer, tables: list[ValueTable], step_dir: Path, block_bytes: int = BLOCK_BYTES) -> None:
    """Load the rows of this rank's shard from the `memory_optim/rows_<a>_<b>.safetensors` files
    that overlap them (any saved mp), reading only those rows of each file, in blocks of
    `block_bytes` copied to the tables' device."""
    lo, hi = rows_of(tables)
    legacy = sorted((step_dir / "memory_optim").glob("rows_*_*.pt"))
    if legacy:
        raise CheckpointError(f"{legacy[0]}: the memory optimizer state is in the pickle format of an older "
                              f"smft_dist, which this one no longer reads: resume it with that version, or start "
                              f"from its weights with model.init_from={step_dir} and checkpoint.resume=none")
    device = tables[0].weight.device  # where the optimizer keeps its row state: the host holds one block at a time
    parts = [read_row_state(f, max(a, lo), min(b, hi), device, block_bytes)
             for a, b, f in _row_files(step_dir / "memory_optim", "rows_*_*.safetensors") if max(a, lo) < min(b, hi)]
    if parts:
        optimizer.load_state_dict(merge_state_dicts(parts))


def drop_row_state(step_dir: Path, ids_by_table: list[torch.Tensor]) -> list[str]:
    """Remove the optimizer state of the global rows `ids_by_table[i]` of the i-th memory table
    from a checkpoint's row-state files: those rows restart as never updated. -> the files
    rewritten (relative to `step_dir`; their manifest entries are the caller's, `update_manifest`)."""
    changed = []
    for a, b, f in _row_files(step_dir / "memory_optim", "rows_*_*.safetensors"):
        state = read_row_state(f, a, b)
        keep = [~torch.isin(t["ids"], ids) for t, ids in zip(state["tables"], ids_by_table)]
        if all(k.all() for k in keep):
            continue
        state["tables"] = [{name: v[k] for name, v in t.items()} for t, k in zip(state["tables"], keep)]
        tmp = f.with_name(f.name + ".tmp")  # in a complete step: a crash leaves the old file whole
        save_row_state(state, tmp)
        os.replace(tmp, f)
        changed.append(f.relative_to(step_dir).as_posix())
    return changed


