"""`smft-patch`: export, apply, revert, merge and show knowledge patches (a thin layer over
smft_dist.patch).

    smft-patch export runs/tiny/finetune_sparse --out learned.smftpatch [--steps 1-5 | --groups 3]
    smft-patch show learned.smftpatch --df runs/tiny/finetune_sparse/checkpoints/step_10 --png rows.png
    smft-patch apply learned.smftpatch runs/tiny/hf [--force] [--out runs/tiny/hf_patched]
    smft-patch revert learned.smftpatch runs/tiny/hf_patched --groups 3
    smft-patch merge a.smftpatch b.smftpatch --out ab.smftpatch
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from smft_dist.errors import console_script
from smft_dist.io import atomic_dir
from smft_dist.patch.apply import apply_patch, open_target, revert_steps, steps_of
from smft_dist.patch.audit import audit, load_df, plot
from smft_dist.patch.patch import Patch, export_patch, merge_patches, parse_ids



def _patch_or_run(path: str) -> Patch:
    """A patch file, or a run (its whole ledger)."""
    return Patch.load(path) if Path(path).is_file() else export_patch(path)


@contextmanager
def _writable_target(a):
    """The model `a.model` opened for writing. With --out, a copy of it that becomes `a.out` only
    when the command succeeds (a refusal leaves no `a.out`; an existing one needs --overwrite);
    messages name the model the user gave, not the copy."""
    if not a.out:
        yield open_target(a.model, writable=True)
        return
    open_target(a.model)  # not a model: say so, naming it, before anything is copied
    with atomic_dir(a.out, a.overwrite) as tmp:
        shutil.copytree(a.model, tmp, dirs_exist_ok=True)
        target = open_target(tmp, writable=True)
        target.where = str(Path(a.model) / Path(target.where).relative_to(tmp))
        yield target


def cmd_export(a) -> list[str]:
    patch = export_patch(a.run, parse_ids(a.steps, "--steps"), parse_ids(a.groups, "--groups"))
    path = patch.save(a.out)
    rows = {n: int(patch.touched(n).numel()) for n in patch.layers}
    return [f"wrote {path}: {len(patch.steps)} steps, rows {rows}, base {patch.base_sha256[:16]}, "
            f"result {patch.result_sha256[:16]}"]


def cmd_apply(a) -> list[str]:
    patch = Patch.load(a.patch)
    with _writable_target(a) as target:
        return apply_patch(patch, target, force=a.force).lines()


def cmd_revert(a) -> list[str]:
    patch = Patch.load(a.patch)
    steps = steps_of(patch, parse_ids(a.steps, "--steps"), parse_ids(a.groups, "--groups"))
    with _writable_target(a) as target:
        report = revert_steps(patch, target, steps, force=a.force)
    return [f"reverted steps {steps}"] + report.lines()


def cmd_merge(a) -> list[str]:
    merged, report = merge_patches([Patch.load(p) for p in a.patches])
    path = merged.save(a.out)
    return [f"wrote {path}: {len(merged.steps)} steps from {len(a.patches)} patches"] + report.lines()


def cmd_show(a) -> list[str]:
    patch = _patch_or_run(a.patch)
    if a.steps or a.groups:
        patch = patch.select(parse_ids(a.steps, "--steps"), parse_ids(a.groups, "--groups"))
    df, batches = load_df(a.df, patch.layers) if a.df else (None, None)
    report = audit(patch, df, batches, a.top)
    lines = report.table()
    if a.png:
        lines.append(f"plot: {plot(patch, a.png)}")
    if a.json:
        Path(a.json).write_text(json.dumps(report.as_dict(), indent=1))
        lines.append(f"json: {a.json}")
    return lines


@console_script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="smft-patch", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a run's recorded updates (all, or chosen steps / groups) -> a patch file")
    e.add_argument("run", help="a sparse-memory finetune's out_dir (or its ledger/ folder)")
    e.add_argument("--out", required=True, help="the patch file to write")
    e.add_argument("--steps", help="steps to keep, e.g. 1-5,8")
    e.add_argument("--groups", help="groups (data `group` ids, e.g. fact ids) to keep, e.g. 3,4")
    ap = sub.add_parser("apply", help="apply a patch to an exported HF folder or a checkpoint, in place")
    rv = sub.add_parser("revert", help="undo chosen steps of a patch on a model that holds it")
    for q in (ap, rv):
        q.add_argument("patch")
        q.add_argument("model", help="an exported Hugging Face folder or a checkpoint folder (any mp size)")
        q.add_argument("--force", action="store_true", help="proceed on rows that differ (their deltas are added)")
        q.add_argument("--out", help="change a copy of the model, written here only if the command succeeds")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    rv.add_argument("--steps", help="steps to undo, e.g. 3,5-7")
    rv.add_argument("--groups", help="undo every step that learned these groups, e.g. 4")
    m = sub.add_parser("merge", help="combine patches (in order) into one; reports rows several write")
    m.add_argument("patches", nargs="+")
    m.add_argument("--out", required=True)
    s = sub.add_parser("show", help="rows per step and group, shared rows, most-written rows and their df")
    s.add_argument("patch", help="a patch file or a run folder")
    s.add_argument("--steps")
    s.add_argument("--groups")
    s.add_argument("--df", help="a checkpoint step folder or an exported HF folder: its background df")
    s.add_argument("--png", help="plot rows against steps into this PNG")
    s.add_argument("--json", help="also write the audit as JSON")
    s.add_argument("--top", type=int, default=10, help="most-written rows to list")
    a = p.parse_args(argv)
    if a.command == "show" and a.top < 0:
        p.error(f"--top {a.top}: must be >= 0 (the most-written rows to list)")
    commands = {"export": cmd_export, "apply": cmd_apply, "revert": cmd_revert, "merge": cmd_merge, "show": cmd_show}
    print("\n".join(commands[a.command](a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
