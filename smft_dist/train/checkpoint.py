"""Atomic, row-sharded checkpoints that reload at a different memory-parallel size.

Layout of ``<checkpoint.dir>/step_<N>/``:

    meta.json                 step, world, mp, the run config (written last: its presence = complete)
    dense.safetensors         full dense weights (everything but the memory values), rank 0
    memory/<layer>.rows_<a>_<b>.safetensors   rows [a, b) of a memory table, one file per mp rank
    df/<layer>.safetensors    the background df of each memory layer (full vector)
    memory_optim_rank<r>.pt   row-sparse optimizer state, keyed by global row id (reshardable)
    dense_optim.pt | deepspeed/ | fsdp_optim/   the dense engine's optimizer state
    data_rank<r>.json, rng_rank<r>.pt           data position and RNG of each rank

A save writes into ``step_<N>.tmp`` and renames it when every rank is done, then replaces the
``latest`` file (os.replace is atomic): a crash mid-save leaves the previous checkpoint loadable
and still named by ``latest``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smft_dist.memory.values import ValueTable

LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir, or a checkpoint root (-> the step named by its `latest` file)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if (p / LATEST).is_file():
        step_dir = p / (p / LATEST).read_text().strip()
        if (step_dir / "meta.json").is_file():
            return step_dir
        raise CheckpointError(f"{p / LATEST} names {step_dir.name}, which is incomplete or missing")
    raise CheckpointError(f"{p} is not a checkpoint (no meta.json) nor a checkpoint folder (no '{LATEST}' file)")


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The step named by `root/latest`; None when there is none yet. A `latest` that names a missing
    or incomplete step raises: silently starting afresh would train over a run the user meant to resume."""
    root = Path(root)
    return resolve_checkpoint(root) if (root / LATEST).is_file() else None


# ----- memory tables -----
def layer_names(model) -> list[str]:
    return [f"layer{i}" for i in model.config.memory_layers]


def save_memory(tables: list[ValueTable], names: list[str], step_dir: Path, replicate_rank: int = 0) -> None:
    if replicate_rank != 0:  # replicas hold the same rows
        return
    (step_dir / "memory").mkdir(exist_ok=True)
    for name, t in zip(names, tables):
        save_file({"rows": t.weight.detach().cpu().contiguous()},
                  str(step_dir / "memory" / f"{name}.rows_{t.row_start}_{t.row_end}.safetensors"),
                  metadata={"num_rows": str(t.num_rows), "dim": str(t.dim)})


def load_memory(tables: list[ValueTable], names: list[str], step_dir: Path) -> None:
    """Fill each table's rows [row_start, row_end) from the saved shards, whatever mp they were
    saved at: reads only the overlapping slices (O(local rows))."""
    for name, t in zip(names, tables):
        files = sorted((step_dir / "memory").glob(f"{name}.rows_*_*.safetensors"))
        if not files:
            raise CheckpointError(f"{step_dir}: no memory shards for {name}: the checkpoint is of another model "
                                  f"(memory_layers differ?)")
        filled = 0
        for f in files:
            a, b = map(int, re.search(r"rows_(\d+)_(\d+)", f.name).groups())
            lo, hi = max(a, t.row_start), min(b, t.row_end)
            with safe_open(str(f), framework="pt") as fh:
                meta = fh.metadata()
                if int(meta["num_rows"]) != t.num_rows or int(meta["dim"]) != t.dim:
                    raise CheckpointError(
                        f"{f}: memory table is {meta['num_rows']} x {meta['dim']}, the model's is "
                        f"{t.num_rows} x {t.dim}: the checkpoint is of another model shape (memory_n_keys/value_dim)")
                if lo < hi:
                    rows = fh.get_slice("rows")[lo - a:hi - a]
                    with torch.no_grad():
                        t.weight[lo - t.row_start:hi - t.row_start] = rows.to(t.weight.dtype)
                    filled += hi - lo
        if filled != t.row_end - t.row_start:
            raise CheckpointError(f"{step_dir}: the memory shards of {name} cover {filled} of this rank's "
                                  f"{t.row_end - t.row_start} rows: the checkpoint is incomplete")


def load_dense(model, step_dir: Path) -> None:
    """Load dense weights into an unwrapped model; shapes must match exactly."""
    state = load_file(str(step_dir / "dense.safetensors"))
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise CheckpointError(f"{step_dir}: weight {k} is not in this model: the checkpoint is of another model")
        if own[k].shape != v.shape:
            raise CheckpointError(f"{step_dir}: {k} has shape {tuple(v.shape)}, the model's is "
                                  f"{tuple(own[k].shape)}: the checkpoint is of another model shape")
    missing = [k for k in own if k not in state and not k.endswith(".values.weight")]  # add mode: mlp.memory.values
    if missing:
        raise CheckpointError(f"{step_dir}: missing weights {missing[:3]}...: the checkpoint is of another model")
    model.load_state_dict(state, strict=False)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


class Checkpointer:
    """Decides when to save (`every` steps and at the end) and how to resume."""

    def __init__(self, root: str | os.PathLike, every: int = 0, keep: int = 2):
        self.root, self.every, self.keep = Path(root), every, keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, *, model, tables, engine, memory_optimizer, df_indexes, loader, meta: dict,
             replicate_rank: int = 0, mp_rank: int = 0) -> Path:
        rank = _rank()
        final = self.root / f"step_{step}"
        tmp = self.root / f"step_{step}.tmp"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        dense = engine.dense_state_dict()  # collective under FSDP2
        if rank == 0:
            save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / "dense.safetensors"))
        save_memory(tables, layer_names(model), tmp, replicate_rank)
        if df_indexes:
            (tmp / "df").mkdir(exist_ok=True) if rank == 0 else None
            _barrier()
            for name, index in zip(layer_names(model), df_indexes):
                if index is not None:
                    index.save(tmp / "df" / f"{name}.safetensors")  # collective, rank 0 writes
        engine.save(tmp)
        if memory_optimizer is not None and replicate_rank == 0:
            torch.save(memory_optimizer.state_dict(), tmp / f"memory_optim_rank{mp_rank}.pt")
        if loader is not None and hasattr(loader, "state_dict"):
            (tmp / f"data_rank{rank}.json").write_text(json.dumps(loader.state_dict(), default=int))
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        _barrier()
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (self.root / f"{LATEST}.tmp").write_text(final.name)
            os.replace(self.root / f"{LATEST}.tmp", self.root / LATEST)
            self._prune(step)
        _barrier()
        return final

    def _prune(self, step: int) -> None:
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))
        for s in steps[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.root / f"step_{s}", ignore_errors=True)
        for p in self.root.glob("step_*.tmp"):  # a crashed save's leftovers
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load_rank_state(step_dir: Path, engine, memory_optimizer, loader, mp_rank: int, same_layout: bool) -> None:
        """Optimizer states, data position and RNG (the weights are loaded before the engine wraps
        the model). Optimizer and data state need the same world layout; memory optimizer state
        is keyed by global row id, so every rank reads all files and keeps its own rows."""
        rank = _rank()
        engine.load(step_dir, with_optimizer=same_layout)
        if memory_optimizer is not None:
            files = sorted(step_dir.glob("memory_optim_rank*.pt"))
            states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
            if states:
                memory_optimizer.load_state_dict(_merge_memory_states(states))
        data = step_dir / f"data_rank{rank}.json"
        if same_layout and loader is not None and data.exists() and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(json.loads(data.read_text()))
        rng = step_dir / f"rng_rank{rank}.pt"
        if same_layout and rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))


def _merge_memory_states(states: list[dict]) -> dict:
    """Concatenate per-rank row-sparse optimizer states (keyed by global ids) into one."""
    if len(states) == 1:
        return states[0]
    merged = {}
    for key in states[0]:
        vals = [s[key] for s in states]
        if isinstance(vals[0], torch.Tensor) and vals[0].dim() > 0:
            merged[key] = torch.cat(vals)
        elif isinstance(vals[0], dict):
            merged[key] = _merge_memory_states(vals)
        elif isinstance(vals[0], list):
            merged[key] = [_merge_memory_states([v[i] for v in vals]) if isinstance(vals[0][i], dict)
                           else torch.cat([v[i] for v in vals]) for i in range(len(vals[0]))]
        else:
            merged[key] = vals[0]
    return merged


def read_meta(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / "meta.json").read_text())
