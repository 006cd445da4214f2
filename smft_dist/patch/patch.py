"""Knowledge patches: a run's recorded sparse updates as one self-describing file.

Shape legend: U rows of one memory table that a step (or the patch) wrote, D value dim.

    patch = export_patch("runs/tiny/finetune_sparse", groups=[3])   # the steps that learned fact 3
    patch.save("fact3.smftpatch")
    Patch.load("fact3.smftpatch").steps[0].layers["layer2"].ids   # the global rows it wrote

A patch file is a safetensors file: tensors ``<i>.<layer>.ids|before|after`` for its i-th step
and, in the metadata, a JSON manifest (format, model config, memory layers, rows, value dim,
dtype, the steps with their data, the base and result identities). The base identity is a sha256
of the model config and of every row the patch touches at its value before the patch's first
step that touches it; the result identity likewise after its last. Applying and reverting live in
`smft_dist.patch.apply`, the audit in `smft_dist.patch.audit`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smft_dist.errors import UserError, reason
from smft_dist.patch.ledger import LedgerError, RowUpdate, StepRecord, complete_steps, read_meta, read_step

FORMAT = "smft-patch/1"
# The model config keys that make a patch's rows mean the same thing in another model.
IDENTITY_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "memory_layers", "memory_n_keys", "memory_heads", "memory_knn", "memory_k_dim", "memory_value_dim",
                 "memory_swilu", "memory_value_dtype")


class PatchError(UserError, RuntimeError):
    """A patch does not fit what it is used on; the message names the rows or keys and the fix."""


def model_identity(model_cfg: dict) -> dict:
    return {k: model_cfg[k] for k in IDENTITY_KEYS if k in model_cfg}


def parse_ids(spec: Optional[str], flag: str = "") -> Optional[list[int]]:
    """ "3,5-7" -> [3, 5, 6, 7]; None stays None. `flag`: the option it came from, for the error."""
    if spec is None:
        return None
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise PatchError(f"{flag + ' ' if flag else ''}{spec!r} is not a list of numbers and ranges of numbers "
                             f">= 0 (e.g. 3,5-7)") from None
    return out


@dataclass
class Patch:
    meta: dict  # model config, layers, num_rows, dim, dtype, sources
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    def touched(self, layer: str, steps: Optional[Iterable[StepRecord]] = None) -> torch.Tensor:
        """Sorted unique global ids the steps (default: all) wrote in `layer`."""
        parts = [s.layers[layer].ids for s in (self.steps if steps is None else steps)]
        return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def _edge_rows(self, layer: str, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids_U sorted, values_UD): each row's value before the first step touching it
        (`last` False: the base) or after the last one (`last` True: the result)."""
        if not self.steps:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, self.meta["dim"])
        ids = torch.cat([s.layers[layer].ids for s in self.steps])
        vals = torch.cat([(s.layers[layer].after if last else s.layers[layer].before) for s in self.steps])
        uniq, inv = torch.unique(ids, return_inverse=True)
        pos = torch.arange(ids.numel())
        pick = torch.full_like(uniq, -1 if last else ids.numel()).scatter_reduce_(0, inv, pos, "amax" if last else "amin")
        return uniq, vals[pick]

    def base_rows(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._edge_rows(layer, last=False)

    def result_rows(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._edge_rows(layer, last=True)

    def _identity(self, last: bool) -> str:
        h = hashlib.sha256(json.dumps(model_identity(self.meta["model"]), sort_keys=True).encode())
        for layer in self.layers:
            ids, vals = self._edge_rows(layer, last)
            h.update(layer.encode())
            h.update(ids.numpy().tobytes())
            h.update(vals.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @property
    def base_sha256(self) -> str:
        return self._identity(last=False)

    @property
    def result_sha256(self) -> str:
        return self._identity(last=True)

    def select(self, steps: Optional[Sequence[int]] = None, groups: Optional[Sequence[int]] = None) -> "Patch":
        """The steps numbered in `steps` and/or whose batch held any of `groups` (both None: all)."""
        chosen = self.steps
        if steps is not None:
            missing = sorted(set(steps) - {s.step for s in self.steps})
            if missing:
                have = [s.step for s in self.steps]
                raise PatchError(f"steps {missing} are not in the patch (it holds steps {_ranges(have)})")
            chosen = [s for s in chosen if s.step in set(steps)]
        if groups is not None:
            chosen = [s for s in chosen if set(s.groups) & set(groups)]
            if not chosen:
                have = sorted({g for s in self.steps for g in s.groups})
                raise PatchError(f"no step of the patch learned groups {list(groups)} (its groups: {have}; a batch "
                                 f"without a `group` column records none)")
        return Patch(dict(self.meta), list(chosen))

    # ----- the file -----
    def manifest(self) -> dict:
        return {"format": FORMAT, **self.meta, "base_sha256": self.base_sha256, "result_sha256": self.result_sha256,
                "steps": [{"step": s.step, "groups": s.groups, "batch_sha256": s.batch_sha256,
                           "rows": {n: int(u.ids.numel()) for n, u in s.layers.items()}} for s in self.steps]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        tensors = {}
        for i, s in enumerate(self.steps):
            for n, u in s.layers.items():
                tensors.update({f"{i}.{n}.ids": u.ids, f"{i}.{n}.before": u.before, f"{i}.{n}.after": u.after})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "manifest": json.dumps(self.manifest(), default=str)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Patch":
        path = Path(path)
        if not path.is_file():
            raise PatchError(f"patch {path} does not exist: write one with `smft-patch export RUN --out {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise PatchError(f"{path} is not a knowledge patch (format {md.get('format')!r}, want {FORMAT!r})")
                manifest = json.loads(md["manifest"])
                steps = []
                for i, s in enumerate(manifest.pop("steps")):
                    layers = {n: RowUpdate(*(f.get_tensor(f"{i}.{n}.{k}") for k in ("ids", "before", "after")))
                              for n in manifest["layers"]}
                    steps.append(StepRecord(s["step"], s["groups"], s["batch_sha256"], layers))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # a damaged header or manifest
            raise PatchError(f"{path} is not a readable knowledge patch ({reason(e)}): write it again with "
                             f"`smft-patch export`") from None
        for key in ("format", "base_sha256", "result_sha256"):
            manifest.pop(key, None)
        return cls(manifest, steps)


def _ranges(numbers: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> "1-3,7"."""
    out, numbers = [], sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ",".join(out) or "none"


def ledger_dir(run: str | os.PathLike) -> Path:
    """A run's out_dir (holding ledger/) or the ledger folder itself."""
    run = Path(run)
    return run / "ledger" if (run / "ledger").is_dir() else run


def export_patch(run: str | os.PathLike, steps: Optional[Sequence[int]] = None,
                 groups: Optional[Sequence[int]] = None) -> Patch:
    """The complete steps of a run's ledger (all, or the chosen steps / groups) as a patch."""
    root = ledger_dir(run)
    try:
        meta = read_meta(root)
        meta = {k: meta[k] for k in ("model", "layers", "num_rows", "dim", "dtype")}
    except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise LedgerError(f"{root / 'ledger.json'} is not a readable ledger description ({reason(e)}): the ledger "
                          f"is damaged; its run's checkpoints still hold the learned rows") from None
    names = meta["layers"]
    found = complete_steps(root)
    if not found:
        raise LedgerError(f"{root} holds no complete step yet (or its rank*.index / rank*.records files are "
                          f"damaged)")
    meta["sources"] = [str(root.resolve())]
    whole = Patch(meta, [])
    wanted = set(found) if steps is None else set(steps)
    missing = sorted(wanted - set(found))
    if missing:
        raise PatchError(f"steps {missing} are not complete in {root} (it holds steps {_ranges(list(found))})")
    whole.steps = [read_step(s, found[s], names) for s in sorted(wanted)]
    return whole.select(groups=groups) if groups is not None else whole


@dataclass
class MergeReport:
    conflicts: dict[str, list[tuple[int, list[int]]]]  # layer -> [(row, indices of the patches writing it)]
    renumbered: bool

    def lines(self) -> list[str]:
        out = []
        for layer, rows in self.conflicts.items():
            if rows:
                shown = ", ".join(f"{r} (patches {'+'.join(map(str, ps))})" for r, ps in rows[:10])
                out.append(f"conflict: {layer}: {len(rows)} rows written by more than one patch: {shown}"
                           f"{' ...' if len(rows) > 10 else ''} (applied in order: later deltas add to earlier)")
        if self.renumbered:
            out.append("note: the patches' step numbers collide: steps renumbered 1..n in the given order")
        return out


def merge_patches(patches: Sequence[Patch]) -> tuple[Patch, MergeReport]:
    """One patch holding every step of `patches`, in order; reports rows more than one writes.
    Patches of one run (disjoint step numbers) keep their numbers, sorted by step."""
    if not patches:
        raise PatchError("merge needs at least one patch")
    first = patches[0].meta
    for i, p in enumerate(patches[1:], 1):
        for key in ("layers", "num_rows", "dim", "dtype"):
            if p.meta[key] != first[key]:
                raise PatchError(f"patch {i} has {key}={p.meta[key]}, patch 0 {key}={first[key]}: patches of "
                                 "different models cannot be merged")
        if model_identity(p.meta["model"]) != model_identity(first["model"]):
            raise PatchError(f"patch {i} is of another model config than patch 0: they cannot be merged")
    numbers = [s.step for p in patches for s in p.steps]
    renumbered = len(set(numbers)) != len(numbers)
    steps = [StepRecord(s.step, s.groups, s.batch_sha256, s.layers) for p in patches for s in p.steps]
    if renumbered:
        for n, s in enumerate(steps, 1):
            s.step = n
    else:
        steps.sort(key=lambda s: s.step)
    conflicts = {}
    for layer in first["layers"]:
        owners: dict[int, set[int]] = {}
        for i, p in enumerate(patches):
            for r in p.touched(layer).tolist():
                owners.setdefault(r, set()).add(i)
        conflicts[layer] = [(r, sorted(ps)) for r, ps in sorted(owners.items()) if len(ps) > 1]
    meta = {**first, "sources": [src for p in patches for src in p.meta.get("sources", [])]}
    return Patch(meta, steps), MergeReport(conflicts, renumbered)
