"""The checkpointer: saves and restores every stateful part of a run, at any world size.

    checkpointer = Checkpointer(cfg, ctx)        # resolves checkpoint.resume, checks the model shape
    trainer, loader = build_run(cfg, ctx), ...   # fresh or model.init_from weights
    step = checkpointer.load(trainer, loader)    # restores the run (0: nothing to resume)
    checkpointer.save(step)                      # every `checkpoint.every` steps; force=True at the end

A step folder ``<checkpoint.dir>/step_<N>/`` holds meta.json (written last: its presence means
complete), the manifest, the dense weights, the memory shards and their row-sparse optimizer state,
the df index, the dense engine's state, the data position and each rank's RNG: the files, and
reading and writing them, are smft_dist/checkpoint/layout.py (docs/design.md §6).

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

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from smft_dist.checkpoint.layout import (LATEST, CheckpointError, check_model_matches, complete_steps,
                                         latest_checkpoint, layer_names, load_memory, load_memory_optimizer,
                                         read_dense, read_meta, resolve_checkpoint, rows_of, save_memory,
                                         save_row_state, verify_checkpoint, write_manifest)
from smft_dist.config import CheckpointConfig

log = logging.getLogger("smft_dist")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


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
        tr, ctx = self.trainer, self.ctx
        if tr.ledger is not None:  # its steps up to `step` durable on every rank before the barriers below
            tr.ledger.sync()
        rank = ctx.rank
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
        hashed = {}  # manifest entries of the files hashed while they were streamed out
        if ctx.replicate_rank == 0:  # replicas hold the same rows
            hashed.update(save_memory(tr.tables, names, tmp))
            if tr.memory_optimizer is not None and tr.tables:
                lo, hi = rows_of(tr.tables)
                rows_file = f"memory_optim/rows_{lo}_{hi}.safetensors"
                hashed[rows_file] = save_row_state(tr.memory_optimizer.state_dict(), tmp / rows_file)
        for name, index in zip(names, tr.df_indexes or []):
            if index is not None:
                index.save(tmp / "df" / f"{name}.safetensors")  # collective, rank 0 writes
        tr.engine.save(tmp)
        if rank == 0 and self.loader is not None and hasattr(self.loader, "state_dict"):
            (tmp / "data.json").write_text(json.dumps(self.loader.state_dict(), default=int))
        torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
        _barrier()
        write_manifest(tmp, hashed)
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
