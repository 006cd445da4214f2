"""Input rows for `smft-data`: JSONL (plain, `.gz`, `.zst`), Parquet, text and `datasets` folders.

Every reader yields `(where, row)`: `where` names the row for error messages ("path:line",
"path[row]", "dataset[row]") and `row` is a dict in the source's own field layout (a text file's
line becomes {"text": line}).

`part=(k, n)` keeps only the rows of blocks k, k+n, k+2n, ... (blocks of `block` consecutive rows
over all inputs in order): n workers with k = 0..n-1 read disjoint parts that together are the
whole input. A JSONL line outside the part is skipped before it is parsed.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from smft_dist.data.loader import DataError
from smft_dist.errors import reason

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".text", ".md")
FORMATS = "text (.txt), JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet), or --hf for a datasets folder"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in JSONL_SUFFIXES + TEXT_SUFFIXES + (".parquet",):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def open_text(path: Path):
    """A text stream over a plain, gzip or zstandard file."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8")
    return open(path, encoding="utf-8")


class _Part:
    """Row counter over all inputs: `mine()` says whether the next row belongs to part k of n."""

    def __init__(self, part: tuple[int, int], block: int):
        self.k, self.n = part
        self.block, self.row = block, 0

    def mine(self) -> bool:
        keep = (self.row // self.block) % self.n == self.k
        self.row += 1
        return keep


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file (plain, .gz or .zst); bytes that are not UTF-8 text of
    that compression raise a DataError naming the file."""
    try:
        with open_text(path) as f:
            yield from enumerate(f, 1)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: not UTF-8 text ({reason(e)}): the file is damaged or of another format; "
                        f"use {FORMATS}") from None


def _jsonl(path: Path, part: _Part) -> Iterator[tuple[str, dict]]:
    for i, line in _lines(path):
        if not line.strip() or not part.mine():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not a JSON object ({e}): write one object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: a JSON {type(row).__name__}, not an object: write one object per line")
        yield f"{path}:{i}", row


def _parquet(path: Path, part: _Part) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            if part.mine():
                yield f"{path}[{i}]", row
            i += 1


def _text(path: Path, part: _Part) -> Iterator[tuple[str, dict]]:
    for i, line in _lines(path):
        if line.strip() and part.mine():
            yield f"{path}:{i}", {"text": line.strip()}


def _hf(name: str, config: str | None, split: str, part: _Part) -> Iterator[tuple[str, dict]]:
    import datasets

    if Path(name).is_dir():
        try:
            ds = datasets.load_from_disk(name)
        except FileNotFoundError as e:
            raise DataError(f"--hf {name}: not a datasets save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"--hf {name}: no split {split!r} (has {list(ds)}): pass --split")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split)
    for i, row in enumerate(ds):
        if part.mine():
            yield f"{name}[{i}]", row


def read_rows(inputs: list[str], hf: str | None = None, hf_config: str | None = None, split: str = "train",
              part: tuple[int, int] = (0, 1), block: int = 1024) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of `hf` (if given) and then of each input file, in order."""
    counter = _Part(part, block)
    if hf is not None:
        yield from _hf(hf, hf_config, split, counter)
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file: check the path")
        suffix = _suffix(path)
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl(path, counter)
        elif suffix == ".parquet":
            yield from _parquet(path, counter)
        elif suffix in TEXT_SUFFIXES or suffix == "":
            yield from _text(path, counter)
        else:
            raise DataError(f"input {path}: unknown format {suffix!r}: use {FORMATS}")


def check_inputs(inputs: list[str], hf: str | None) -> None:
    """Fail before any work on a missing input or an unknown format."""
    if not inputs and hf is None:
        raise DataError(f"no input: pass files ({FORMATS})")
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file: check the path")
        if _suffix(path) not in JSONL_SUFFIXES + TEXT_SUFFIXES + (".parquet", ""):
            raise DataError(f"input {path}: unknown format {_suffix(path)!r}: use {FORMATS}")


def read_texts_by_id(path: str | Path, field: str) -> dict:
    """A JSONL of {"id", field: [texts]} (user-written paraphrases or augmentations) -> {id: texts}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass a JSONL of {{\"id\", \"{field}\": [...]}}")
    out = {}
    for where, row in _jsonl(path, _Part((0, 1), 1)):
        texts = row.get(field)
        if "id" not in row or not isinstance(texts, list) or not texts:
            raise DataError(f"{where}: expected {{\"id\", \"{field}\": [one or more texts]}}, got fields {sorted(row)}")
        out[row["id"]] = [str(t) for t in texts]
    if not out:
        raise DataError(f"{path} holds no rows: write one {{\"id\", \"{field}\": [...]}} per line")
    return out
