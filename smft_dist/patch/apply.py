"""Apply and revert knowledge patches on a model folder, a checkpoint or a loaded model.

Shape legend: U rows of one memory table a step wrote, D value dim.

Targets (`open_target`): an exported Hugging Face folder (`smft-export`), a checkpoint (a
`checkpoints/` folder or one `step_<N>/`, row-sharded `memory/<layer>.rows_<a>_<b>.safetensors`
at any mp size) or a live `SmftForCausalLM` whose tables may be row-sharded (`LiveTarget`: each
rank changes the rows it owns, no collective, so a serving process patches itself in place).
File targets are read and written in place, row by row, through the safetensors data offsets:
O(rows touched), never the whole table. A checkpoint stays resumable: the optimizer state of the
rows written is dropped and the changed files are re-hashed into its manifest (`CheckpointTarget`).

apply: every row the patch touches must hold the patch's *before* value at the first step that
touches it (else `PatchMismatch` names the rows; `force` applies those rows' deltas additively).
The steps are then replayed: a row equal to the step's before takes its after (bitwise), any
other row gets `+= after - before` (a patch exported for chosen groups skips steps in between).

revert: chosen steps are undone, latest first. A row no later kept step of the patch
touched returns exactly to its before value; a row that a later kept step also wrote gets the
additive inverse of the reverted step's delta (with plain SGD the memory is the base plus the sum
of the deltas, docs/design.md §1.3) and is reported as an overlap.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from smft_dist.checkpoint import layout as ckpt
from smft_dist.checkpoint.model import read_hf_config
from smft_dist.errors import reason
from smft_dist.patch.patch import Patch, PatchError, model_identity


class PatchMismatch(PatchError):
    """The target's rows are not what the patch expects."""


class _StoredRows:
    """Rows [row_start, row_start + rows) of a 2-D tensor in a safetensors file, memory-mapped:
    reading or writing U rows touches O(U x D) bytes."""

    _NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}
    _TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

    def __init__(self, path: Path, key: str, row_start: int = 0, writable: bool = False):
        header, n = safetensors_header(path)
        info = header[key]
        rows, self.dim = info["shape"]
        self.path, self.written = Path(path), False
        self.dtype = self._TORCH[info["dtype"]]
        self.row_start, self.row_end = row_start, row_start + rows
        self._rows_RD = np.memmap(path, dtype=self._NP[info["dtype"]], mode="r+" if writable else "r",
                                  offset=8 + n + info["data_offsets"][0], shape=(rows, self.dim))

    def read(self, ids_U: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self._rows_RD[(ids_U - self.row_start).numpy()])).view(self.dtype)

    def write(self, ids_U: torch.Tensor, rows_UD: torch.Tensor) -> None:
        self.written = True
        self._rows_RD[(ids_U - self.row_start).numpy()] = rows_UD.to(self.dtype).contiguous().view(
            torch.uint16 if self.dtype == torch.bfloat16 else self.dtype).numpy()

    def flush(self) -> None:
        if self._rows_RD.mode == "r+":
            self._rows_RD.flush()


def safetensors_header(path: Path) -> tuple[dict, int]:
    """-> (the header of a safetensors file: {name: {dtype, shape, data_offsets}}, its length n;
    tensor data starts at byte 8 + n), checked against the file's size: a truncated, emptied or
    foreign file raises a PatchError naming it before any byte is mapped."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # ValueError: not JSON, not UTF-8
        raise PatchError(f"{path} is not a readable safetensors file ({reason(e)}): the model is damaged") from None
    if 8 + n + max(ends, default=0) > size:
        raise PatchError(f"{path} is truncated: its header needs {8 + n + max(ends)} bytes, it has {size}: the model "
                         f"is damaged")
    return header, n


@dataclass
class Target:
    """A model's memory tables as row segments: {layer name: [segments, in row order]}."""

    where: str
    model: dict  # the model config (HF config.json or checkpoint meta)
    segments: dict[str, list] = field(default_factory=dict)

    def _parts(self, layer: str, ids_U: torch.Tensor):
        if layer not in self.segments:
            raise PatchError(f"{self.where} has no memory layer {layer} (it has {list(self.segments)})")
        for seg in self.segments[layer]:
            mask = (ids_U >= seg.row_start) & (ids_U < seg.row_end)
            if mask.any():
                yield seg, mask

    def owned(self, layer: str, ids_U: torch.Tensor) -> torch.Tensor:
        """Which of ids_U this target holds (all of them, but for a sharded live model)."""
        mask = torch.zeros_like(ids_U, dtype=torch.bool)
        for _, m in self._parts(layer, ids_U):
            mask |= m
        return mask

    def read(self, layer: str, ids_U: torch.Tensor) -> torch.Tensor:
        """-> rows_UD for held ids (ask `owned` first)."""
        out = None
        for seg, m in self._parts(layer, ids_U):
            rows = seg.read(ids_U[m])
            out = rows.new_empty(ids_U.numel(), rows.shape[1]) if out is None else out
            out[m] = rows
        return out if out is not None else torch.empty(0, 0)

    def write(self, layer: str, ids_U: torch.Tensor, rows_UD: torch.Tensor) -> None:
        for seg, m in self._parts(layer, ids_U):
            seg.write(ids_U[m], rows_UD[m])

    def flush(self) -> None:
        for segs in self.segments.values():
            for seg in segs:
                seg.flush()


@dataclass
class CheckpointTarget(Target):
    """A checkpoint's step folder; `flush` keeps the rest of the checkpoint true to the rows written.

    The optimizer state of a row sums up the updates that made its value: the fp32 master copy
    (bf16 tables) is the value itself, momentum and AdamW's moments and step count are its recent
    gradients. A patched row's value now comes from another history (the patch's run, or for a
    revert the value before it) whose state the patch does not carry. Kept, that state would undo
    the patch at the row's next update: a stale master overwrites the new value, a momentum buffer
    re-applies the reverted step's gradient. Adjusting it cannot be right either (the other
    history's moments are unknown), so the state of every row written is dropped: the row resumes
    as one the optimizer never updated (master made from its new stored value, moments zero), as
    in a finetune started from these weights with model.init_from.
    """

    step_dir: Optional[Path] = None
    written: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer -> ids written

    def write(self, layer: str, ids_U: torch.Tensor, rows_UD: torch.Tensor) -> None:
        super().write(layer, ids_U, rows_UD)
        self.written.setdefault(layer, []).append(ids_U)

    def flush(self) -> None:
        super().flush()
        if not self.written:
            return
        names = [f"layer{i}" for i in self.model["memory_layers"]]  # the row-state files' table order
        ids = [torch.unique(torch.cat(self.written[n])) if n in self.written else torch.zeros(0, dtype=torch.long)
               for n in names]
        changed = [seg.path.relative_to(self.step_dir).as_posix() for segs in self.segments.values() for seg in segs
                   if seg.written]
        ckpt.update_manifest(self.step_dir, changed + ckpt.drop_row_state(self.step_dir, ids))
        self.written = {}


class _TableRows:
    """A live `ValueTable`'s rows (a shard under torch.distributed)."""

    def __init__(self, table):
        self.table, self.row_start, self.row_end = table, table.row_start, table.row_end

    def read(self, ids_U):
        return self.table.weight.detach()[(ids_U - self.row_start).to(self.table.weight.device)].cpu()

    @torch.no_grad()
    def write(self, ids_U, rows_UD):
        w = self.table.weight
        w[(ids_U - self.row_start).to(w.device)] = rows_UD.to(w.device, w.dtype)

    def flush(self):
        pass


def live_target(model) -> Target:
    """A loaded `SmftForCausalLM` (one process, or this rank's shards): patch it without a restart."""
    return Target("the loaded model", model.config.to_dict(),
                  {n: [_TableRows(layer.values)] for n, layer in zip(ckpt.layer_names(model), model.memory_layers())})


def open_target(path: str | Path, writable: bool = False) -> Target:
    """An exported HF folder or a checkpoint (root or step folder, any mp size)."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        config = read_hf_config(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():  # weights in several files
            files = json.loads(index.read_text())["weight_map"]
        else:
            files = dict.fromkeys(safetensors_header(path / "model.safetensors")[0], "model.safetensors")
        segments = {}
        for i in config.get("memory_layers", []):
            pattern = re.compile(rf"(.*\.)?layers\.{i}\.mlp\.(.*\.)?values\.weight")
            key = next((k for k in files if pattern.fullmatch(k)), None)
            if key is None:
                raise PatchError(f"{path}: no memory values of layer {i} in the weights")
            segments[f"layer{i}"] = [_StoredRows(path / files[key], key, 0, writable)]
        return Target(str(path), config, segments)
    try:
        step_dir = ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise PatchError(f"{path} is neither an exported Hugging Face folder (config.json) nor a checkpoint: {e}") \
            from None
    if writable:  # re-hashing a damaged file into the manifest would make its damage pass as intact
        ckpt.check_intact(step_dir)
    segments = {}
    for f in sorted((step_dir / "memory").glob("*.rows_*_*.safetensors")):
        m = re.fullmatch(r"(.+)\.rows_(\d+)_(\d+)\.safetensors", f.name)
        segments.setdefault(m.group(1), []).append(_StoredRows(f, "rows", int(m.group(2)), writable))
    return CheckpointTarget(str(step_dir), ckpt.read_meta(step_dir)["model"], segments, step_dir=step_dir)


def check_model(patch: Patch, target: Target) -> None:
    want, have = model_identity(patch.meta["model"]), model_identity(target.model)
    # an HF config names the value dtype the same way; keys it lacks are not compared
    bad = {k: (want[k], have[k]) for k in want if k in have and want[k] != have[k]}
    if bad or set(patch.layers) - set(target.segments):
        raise PatchMismatch(f"{target.where} is another model than the patch's: "
                            + ", ".join(f"{k}={h} (patch: {w})" for k, (w, h) in bad.items())
                            + (f" memory layers {sorted(target.segments)} (patch: {patch.layers})" if not bad else ""))


def _differing(cur_UD: torch.Tensor, want_UD: torch.Tensor) -> torch.Tensor:
    """Rows of cur that differ bitwise from want."""
    return ~(cur_UD.view(torch.uint8) == want_UD.to(cur_UD.dtype).view(torch.uint8)).all(dim=1)


def _rows_of(rows: tuple[torch.Tensor, torch.Tensor], ids_U: torch.Tensor) -> torch.Tensor:
    """The values of `ids_U` (a subset) out of (sorted ids, values)."""
    return rows[1][torch.searchsorted(rows[0], ids_U)]


def _mismatch_message(what: str, target: Target, bad: dict[str, torch.Tensor], fix: str) -> str:
    parts = [f"{layer} rows {ids[:12].tolist()}{' ...' if ids.numel() > 12 else ''} ({ids.numel()} rows)"
             for layer, ids in bad.items() if ids.numel()]
    return f"{target.where}: {'; '.join(parts)} do not hold the patch's {what} values: {fix}"


@dataclass
class ApplyReport:
    rows: dict[str, int]  # rows written per layer
    forced: dict[str, list[int]]  # rows whose base differed (applied additively with force)

    def lines(self) -> list[str]:
        out = [f"applied: {layer}: {n} rows" for layer, n in self.rows.items()]
        out += [f"forced: {layer}: rows {ids[:12]}{' ...' if len(ids) > 12 else ''} ({len(ids)}) differed from the "
                f"patch's base; their deltas were added" for layer, ids in self.forced.items() if ids]
        return out


def apply_patch(patch: Patch, target: Target, force: bool = False) -> ApplyReport:
    check_model(patch, target)
    forced, bad = {}, {}
    for layer in patch.layers:
        ids_U, base_UD = patch.base_rows(layer)
        mine = target.owned(layer, ids_U)
        ids_U, base_UD = ids_U[mine], base_UD[mine]
        diff = _differing(target.read(layer, ids_U), base_UD) if ids_U.numel() else ids_U.bool()
        bad[layer] = ids_U[diff]
    if any(b.numel() for b in bad.values()) and not force:
        applied = all(not _differing(target.read(layer, ids), _rows_of(patch.result_rows(layer), ids)).any()
                      for layer, ids in bad.items() if ids.numel())
        why = ("the target already holds the patch's result (it is the finetuned model, or the patch was applied)"
               if applied else "this is not the model the patch was made on")
        raise PatchMismatch(_mismatch_message("base", target, bad, f"{why} (pass --force to add the patch's deltas "
                                              "to these rows anyway)"))
    rows = {}
    for layer in patch.layers:
        forced[layer] = bad[layer].tolist()
        for s in patch.steps:
            u = s.layers[layer]
            mine = target.owned(layer, u.ids)
            if not mine.any():
                continue
            ids_U, before_UD, after_UD = u.ids[mine], u.before[mine], u.after[mine]
            cur_UD = target.read(layer, ids_U)
            other = _differing(cur_UD, before_UD)
            new_UD = after_UD.to(cur_UD.dtype).clone()
            new_UD[other] = (cur_UD[other].float() + after_UD[other].float() - before_UD[other].float()).to(cur_UD.dtype)
            target.write(layer, ids_U, new_UD)
        rows[layer] = int(target.owned(layer, patch.touched(layer)).sum())
    target.flush()
    return ApplyReport(rows, forced)


@dataclass
class RevertReport:
    restored: dict[str, int]  # rows returned exactly to their value before the reverted steps
    overlaps: list[dict] = field(default_factory=list)  # {layer, row, step, later_steps, later_groups}
    forced: dict[str, list[int]] = field(default_factory=dict)  # rows that did not hold the result (--force)

    def lines(self) -> list[str]:
        out = [f"restored exactly: {layer}: {n} rows" for layer, n in self.restored.items()]
        out += [f"forced: {layer}: rows {ids[:12]}{' ...' if len(ids) > 12 else ''} ({len(ids)}) did not hold the "
                f"patch's result; the reverted deltas were subtracted from them" for layer, ids in self.forced.items() if ids]
        by_step: dict[tuple[str, int], list[dict]] = {}
        for o in self.overlaps:
            by_step.setdefault((o["layer"], o["step"]), []).append(o)
        for (layer, step), overlaps in sorted(by_step.items()):
            later: dict[int, int] = {}
            for o in overlaps:
                for k in o["later_steps"]:
                    later[k] = later.get(k, 0) + 1
            rows = [o["row"] for o in overlaps]
            groups = sorted({g for o in overlaps for g in o["later_groups"]})
            out.append(f"overlap: {layer}: {len(rows)} rows of step {step} were also written later (step: rows "
                       f"{dict(sorted(later.items()))}; groups {groups}): the step's delta was subtracted from them: "
                       f"rows {rows[:12]}{' ...' if len(rows) > 12 else ''}")
        return out


def revert_steps(patch: Patch, target: Target, steps: Sequence[int], force: bool = False) -> RevertReport:
    """Undo `steps` of `patch` on a target that holds the patch's result (see module docstring)."""
    check_model(patch, target)
    reverted = sorted(patch.select(steps=steps).steps, key=lambda s: -s.step)  # latest first
    keep = [s for s in patch.steps if s.step not in set(steps)]
    bad = {}
    for layer in patch.layers:
        ids_U, result_UD = patch.result_rows(layer)
        mine = target.owned(layer, ids_U) & torch.isin(ids_U, patch.touched(layer, reverted))
        ids_U, result_UD = ids_U[mine], result_UD[mine]
        bad[layer] = ids_U[_differing(target.read(layer, ids_U), result_UD)] if ids_U.numel() else ids_U
    if any(b.numel() for b in bad.values()) and not force:
        raise PatchMismatch(_mismatch_message("result", target, bad, "the target does not hold this patch's "
                                              "updates (apply it first, or pass --force to subtract the deltas anyway)"))
    report = RevertReport({}, forced={layer: ids.tolist() for layer, ids in bad.items()})
    for s in reverted:
        for layer in patch.layers:
            u = s.layers[layer]
            mine = target.owned(layer, u.ids)
            ids_U, before_UD, after_UD = u.ids[mine], u.before[mine], u.after[mine]
            if not ids_U.numel():
                continue
            later = [k for k in keep if k.step > s.step]
            later_hits = [torch.isin(ids_U, k.layers[layer].ids) for k in later]
            shared = torch.stack(later_hits).any(0) if later_hits else torch.zeros_like(ids_U, dtype=torch.bool)
            additive = shared | torch.isin(ids_U, bad[layer])  # forced rows that differed: subtract too
            cur_UD = target.read(layer, ids_U)
            new_UD = before_UD.to(cur_UD.dtype).clone()
            new_UD[additive] = (cur_UD[additive].float() - after_UD[additive].float()
                                + before_UD[additive].float()).to(cur_UD.dtype)
            target.write(layer, ids_U, new_UD)
            for j in shared.nonzero().flatten().tolist():
                hits = [k for k, h in zip(later, later_hits) if h[j]]
                report.overlaps.append({"layer": layer, "row": int(ids_U[j]), "step": s.step,
                                        "later_steps": [k.step for k in hits],
                                        "later_groups": sorted({g for k in hits for g in k.groups})})
    for layer in patch.layers:  # rows of the reverted steps minus the overlaps and the forced rows
        touched = patch.touched(layer, reverted)
        overlap = {o["row"] for o in report.overlaps if o["layer"] == layer} | set(report.forced[layer])
        report.restored[layer] = int(target.owned(layer, touched).sum()) - len(overlap)
    target.flush()
    return report


def steps_of(patch: Patch, steps: Optional[Sequence[int]] = None, groups: Optional[Sequence[int]] = None) -> list[int]:
    """The step numbers named by `steps` and/or `groups` (as `Patch.select`)."""
    if steps is None and groups is None:
        raise PatchError("name what to revert: --steps (e.g. 3,5-7) or --groups (e.g. 4)")
    return [s.step for s in patch.select(steps, groups).steps]

