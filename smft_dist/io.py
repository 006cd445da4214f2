"""Output folders that are written whole or not at all, and never replaced unasked.

Every command that writes a folder (`smft-data`, `smft-retrofit`, `smft-export`, `smft-patch
apply/revert --out`) writes through `atomic_dir`: an existing non-empty `--out` is refused unless
`--overwrite` is given, and the new folder only takes the name once it is complete.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of `out` to write into; it becomes `out` only when the block
    succeeds, so an interrupted or refused write leaves no folder that looks complete and, with
    `overwrite`, the old `out` intact. An existing `out` (other than an empty folder) is refused
    with FileExistsError unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists: remove it or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap: the old folder is moved aside (not deleted) until the new one holds its name, so no
    # moment leaves `out` missing its old contents without the new ones in place.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir() and not out.is_symlink():
        out.rename(old)
    elif out.exists() or out.is_symlink():
        out.unlink()
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
