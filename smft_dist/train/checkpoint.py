"""The checkpointer: saves and restores every stateful part of a run, at any world size.

    checkpointer = Checkpointer(cfg, ctx)        # resolves checkpoint.resume, checks the model shape
    trainer, loader = build_run(cfg, ctx), ...   # fresh or model.init_from weights
    step = checkpointer.load(trainer, loader)    # restores the run (0: nothing to resume)
    checkpointer.save(step)                      # every `checkpoint.every` steps; force=True at the end

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

What carries over when the world size or mp changed: weights, memory rows and their optimizer
state (both resharded: a rank reads only its own rows of the files that overlap them), the df
index, the data position and the LR schedule. The dense optimizer state (ZeRO partitions, FSDP shards) and the
RNG streams are laid out per rank: they start afresh, with a warning.

A save writes into ``step_<N>.tmp``, renames it when every rank is done, then replaces the
``latest`` file (os.replace is atomic). Re-saving an existing step first moves the old folder to
``step_<N>.old``; a crash at any point leaves ``latest`` resolvable (to the new folder, or to
``.old``). Pruning keeps the newest `keep` steps and never the one ``latest`` names.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from smft_dist.config import CheckpointConfig, ConfigError
from smft_dist.errors import UserError
from smft_dist.memory.values import ValueTable
from smft_dist.optim.sparse import merge_state_dicts

log = logging.getLogger("smft_dist")

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"step_(\d+)")


class CheckpointError(UserError, RuntimeError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


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
    name = (root / LATEST).read_text().strip()
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
    try:
        return json.loads((Path(step_dir) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(step_dir) / 'meta.json'} is unreadable ({e}): the checkpoint is damaged") from None


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


def write_manifest(step_dir: Path) -> None:
    """Collective: every rank hashes a 1/world share of the files; rank 0 writes manifest.json."""
    files = _files(step_dir)
    mine = {f: {"bytes": (step_dir / f).stat().st_size, "sha256": _sha256(step_dir / f)}
            for i, f in enumerate(files) if i % _world() == _rank()}
    manifest = _gather_dicts(mine)
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
    except (OSError, json.JSONDecodeError) as e:
        return [f"{step_dir / MANIFEST} is unreadable ({e})"]
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


def save_memory(tables: list[ValueTable], names: list[str], step_dir: Path) -> None:
    (step_dir / "memory").mkdir(exist_ok=True)
    for name, t in zip(names, tables):
        save_file({"rows": t.weight.detach().cpu().contiguous()},
                  str(step_dir / "memory" / f"{name}.rows_{t.row_start}_{t.row_end}.safetensors"),
                  metadata={"num_rows": str(t.num_rows), "dim": str(t.dim)})


def _row_files(folder: Path, pattern: str) -> list[tuple[int, int, Path]]:
    out = []
    for f in sorted(folder.glob(pattern)):
        a, b = map(int, re.search(r"rows_(\d+)_(\d+)", f.name).groups())
        out.append((a, b, f))
    return out


def load_memory(tables: list[ValueTable], names: list[str], step_dir: Path) -> None:
    """Fill each table's rows [row_start, row_end) from the saved shards, whatever mp they were
    saved at: reads only the overlapping slices (O(local rows))."""
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
                    if lo < hi:
                        rows = fh.get_slice("rows")[lo - a:hi - a]
                        with torch.no_grad():
                            t.weight[lo - t.row_start:hi - t.row_start] = rows.to(t.weight.dtype)
                        filled += hi - lo
            except SafetensorError as e:
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


def _rows_of(tables: list[ValueTable]) -> tuple[int, int]:
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
def save_row_state(state: dict, path: Path) -> None:
    """Write a row-sparse optimizer's `state_dict()` ({"lr", "tables": [{"ids": ids_S, name: state_S}]})."""
    tensors = {}
    for i, table_sd in enumerate(state["tables"]):
        order = torch.argsort(table_sd["ids"])
        tensors.update({f"{i}.{k}": v[order].detach().cpu().contiguous() for k, v in table_sd.items()})
    save_file(tensors, str(path), metadata={"lr": repr(float(state["lr"])), "tables": str(len(state["tables"]))})


class _SortedIds:
    """A file's sorted ids as a sequence that `bisect` searches, one element read per probe."""

    def __init__(self, ids_slice):
        self.ids_slice = ids_slice

    def __len__(self) -> int:
        return self.ids_slice.get_shape()[0]

    def __getitem__(self, i: int) -> int:
        return int(self.ids_slice[i:i + 1][0])


def read_row_state(f: Path, lo: int, hi: int) -> dict:
    """The state of global rows [lo, hi) in one row-state file, as `save_row_state` takes it.
    Reads O(log S) ids for the binary search, then the [lo, hi) slice of each tensor only."""
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta, keys = fh.metadata(), list(fh.keys())
            tables = []
            for i in range(int(meta["tables"])):
                ids = _SortedIds(fh.get_slice(f"{i}.ids"))
                first, last = bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)
                names = [k.split(".", 1)[1] for k in keys if k.split(".", 1)[0] == str(i)]
                tables.append({k: fh.get_slice(f"{i}.{k}")[first:last] for k in names})
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable ({type(e).__name__}: {e}): the checkpoint is damaged") from None
    return {"lr": float(meta["lr"]), "tables": tables}


def load_memory_optimizer(optimizer, tables: list[ValueTable], step_dir: Path) -> None:
    """Load the rows of this rank's shard from the `memory_optim/rows_<a>_<b>.safetensors` files
    that overlap them (any saved mp), reading only those rows of each file."""
    lo, hi = _rows_of(tables)
    legacy = sorted((step_dir / "memory_optim").glob("rows_*_*.pt"))
    if legacy:
        raise CheckpointError(f"{legacy[0]}: the memory optimizer state is in the pickle format of an older "
                              f"smft_dist, which this one no longer reads: resume it with that version, or start "
                              f"from its weights with model.init_from={step_dir} and checkpoint.resume=none")
    parts = [read_row_state(f, max(a, lo), min(b, hi))
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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


class Checkpointer:
    """Saves and restores a run: the trainer's model, memory tables, engine (dense optimizer and LR
    schedule), memory optimizer and df index, the loader's position, the RNG and the step."""

    def __init__(self, cfg: CheckpointConfig, root: str | os.PathLike, ctx, model_cfg=None):
        """Resolves `cfg.resume` (auto | none | path) and checks that the checkpoint holds a model of
        `model_cfg`'s shape: cheap, before anything is built."""
        self.cfg, self.root, self.ctx = cfg, Path(root), ctx
        self.trainer = self.loader = None
        self._saved_step = None
        if cfg.resume == "auto":
            self.resume_dir = latest_checkpoint(self.root)
        elif cfg.resume == "none":
            self.resume_dir = None
        else:
            self.resume_dir = resolve_checkpoint(cfg.resume)
        if self.resume_dir is not None and model_cfg is not None:
            check_model_matches(model_cfg, read_meta(self.resume_dir).get("model", {}), self.resume_dir)

    # ----- load -----
    def _verified_step_dir(self) -> Path:
        """The step to resume from, intact; with checkpoint.fallback and resume=auto, the newest
        intact step when the one `latest` names is damaged."""
        step_dir = self.resume_dir
        problems = verify_checkpoint(step_dir)
        if not problems:
            return step_dir
        root = step_dir.parent
        older = [s for s in complete_steps(root) if s < int(read_meta(step_dir)["step"])]
        if self.cfg.fallback and self.cfg.resume == "auto":
            for s in reversed(older):
                if not verify_checkpoint(root / f"step_{s}"):
                    log.warning("%s is damaged (%s): resuming from the previous intact step %s (checkpoint.fallback)",
                                step_dir, problems[0], root / f"step_{s}")
                    return root / f"step_{s}"
        prev = (f"the previous complete step is {root / f'step_{older[-1]}'}: resume from it with "
                f"checkpoint.resume={root / f'step_{older[-1]}'}, or set checkpoint.fallback=true with resume=auto"
                if older else "there is no earlier step: start afresh with checkpoint.resume=none")
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {'; '.join(problems[:3])}; {prev}")

    def load(self, trainer, loader) -> int:
        """Restore the run into `trainer` and `loader` (which this checkpointer saves from now on).
        Collective. -> the step to continue from (0 when there is nothing to resume)."""
        self.trainer, self.loader = trainer, loader
        if self.resume_dir is None:
            return 0
        step_dir = self._verified_step_dir()
        meta = read_meta(step_dir)
        ctx, engine = self.ctx, trainer.engine
        same = meta.get("world_size") == ctx.world_size and meta.get("mp") == ctx.mp_size
        engine.load_dense_state_dict(read_dense(engine.module, step_dir))
        load_memory(trainer.tables, layer_names(trainer.model), step_dir)
        if trainer.memory_optimizer is not None and trainer.tables:
            load_memory_optimizer(trainer.memory_optimizer, trainer.tables, step_dir)
        if trainer.df_indexes is not None and (step_dir / "df").is_dir():
            from smft_dist.selection import BackgroundIndex

            trainer.df_indexes = [BackgroundIndex.load(step_dir / "df" / f"{n}.safetensors", t)
                                  for n, t in zip(layer_names(trainer.model), trainer.tables)]
        step = int(meta["step"])
        if same:
            engine.load(step_dir)
        else:
            engine.fast_forward_schedule(step)
        data = step_dir / "data.json"
        if loader is not None and data.exists():
            loader.load_state_dict(json.loads(data.read_text()))
        rng = step_dir / f"rng_rank{ctx.rank}.pt"
        if same and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        self._saved_step = step
        if ctx.is_main:
            print(f"resumed from {step_dir} at step {step}", flush=True)
            if not same:
                log.warning("the checkpoint was written at world %s / mp %s, this run is world %d / mp %d: weights, "
                            "memory and its optimizer state are resharded, the data position and LR schedule "
                            "continue; the dense optimizer state and RNG start afresh",
                            meta.get("world_size"), meta.get("mp"), ctx.world_size, ctx.mp_size)
        return step

    # ----- save -----
    def save(self, step: int, force: bool = False) -> Optional[Path]:
        """Write step `step` when it is due (every `checkpoint.every` steps) or `force`d. Collective.
        A step this process already saved is not written twice. -> the step folder, or None."""
        due = self.cfg.every > 0 and step % self.cfg.every == 0
        if not (due or force):
            return None
        final = self.root / f"step_{step}"
        if self._saved_step == step and (final / "meta.json").is_file():
            return final
        self._write(step, final)
        self._saved_step = step
        return final

    def _write(self, step: int, final: Path) -> None:
        tr, ctx, rank = self.trainer, self.ctx, _rank()
        tmp = self.root / f"step_{step}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "df").mkdir() if tr.df_indexes else None
            (tmp / "memory_optim").mkdir() if tr.memory_optimizer is not None else None
        _barrier()
        dense = tr.engine.dense_state_dict()  # collective under FSDP2
        if rank == 0:
            save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / "dense.safetensors"))
        names = layer_names(tr.model)
        if ctx.replicate_rank == 0:  # replicas hold the same rows
            save_memory(tr.tables, names, tmp)
            if tr.memory_optimizer is not None and tr.tables:
                lo, hi = _rows_of(tr.tables)
                save_row_state(tr.memory_optimizer.state_dict(), tmp / "memory_optim" / f"rows_{lo}_{hi}.safetensors")
        for name, index in zip(names, tr.df_indexes or []):
            if index is not None:
                index.save(tmp / "df" / f"{name}.safetensors")  # collective, rank 0 writes
        tr.engine.save(tmp)
        if rank == 0 and self.loader is not None and hasattr(self.loader, "state_dict"):
            (tmp / "data.json").write_text(json.dumps(self.loader.state_dict(), default=int))
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        _barrier()
        write_manifest(tmp)
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **tr.checkpoint_meta()}, indent=1, default=str))
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)  # `latest` may name `final`: it resolves to .old until the next rename
            os.replace(tmp, final)
            (self.root / f"{LATEST}.tmp").write_text(final.name)
            os.replace(self.root / f"{LATEST}.tmp", self.root / LATEST)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(final.name)
        _barrier()

    def _prune(self, latest: str) -> None:
        steps = complete_steps(self.root)
        keep = set(steps[-self.cfg.keep:]) if self.cfg.keep > 0 else set(steps)
        for s in steps:
            if s not in keep and f"step_{s}" != latest:
                shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)
        for p in list(self.root.glob("step_*.tmp")) + list(self.root.glob("step_*.old")):  # crashed saves' leftovers
            shutil.rmtree(p, ignore_errors=True)
