"""Token samples in the fixed MDS schema the trainer reads, and atomic MDS writing.

Schema of every sample (L = seq_len):
    input_ids       int32 [L]
    attention_mask  uint8 [L]   0 on padding
    loss_mask       uint8 [L]   1 where the token's prediction is trained (packed text: all 1)
    group           int         optional (e.g. the fact a paraphrase belongs to)

Two layouts:
- packed (pretraining): every document becomes `<s> doc </s>`; the stream is cut into L-token
  chunks; the last chunk is padded.
- per example (finetuning): one `<s> prompt completion </s>` per sample, right-padded to L. With
  a prompt the loss covers only the completion and `</s>`; a plain text trains on all its tokens.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from smft_dist.data.streaming_compat import import_streaming

COLUMNS = {"input_ids": "ndarray:int32", "attention_mask": "ndarray:uint8", "loss_mask": "ndarray:uint8"}


@dataclass
class WriteStats:
    samples: int = 0
    tokens: int = 0  # non-padding tokens
    truncated: int = 0  # examples cut to fit seq_len


def _sample(ids: Sequence[int], loss: Sequence[int], seq_len: int, pad_id: int, group: int | None) -> dict:
    n = len(ids)
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    input_ids[:n] = ids
    attention = np.zeros(seq_len, dtype=np.uint8)
    attention[:n] = 1
    loss_mask = np.zeros(seq_len, dtype=np.uint8)
    loss_mask[:n] = loss
    out = {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
    if group is not None:
        out["group"] = int(group)
    return out


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def packed_samples(tokenizer, texts: Iterable[str], seq_len: int, stats: WriteStats,
                   chunk: int = 4096) -> Iterator[dict]:
    """`<s> text </s>` for each text, concatenated and cut into `seq_len` chunks."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    buf: list[int] = []
    texts = iter(texts)
    while batch := [t for _, t in zip(range(chunk), texts)]:
        for ids in _ids(tokenizer, batch):
            buf += ([bos] if bos is not None else []) + ids + [eos]
        while len(buf) >= seq_len:
            stats.samples += 1
            stats.tokens += seq_len
            yield _sample(buf[:seq_len], [1] * seq_len, seq_len, pad, None)
            buf = buf[seq_len:]
    if buf:  # the tail, padded
        stats.samples += 1
        stats.tokens += len(buf)
        yield _sample(buf, [1] * len(buf), seq_len, pad, None)


def example_samples(tokenizer, records: Iterable[dict], seq_len: int, stats: WriteStats,
                    chunk: int = 4096) -> Iterator[dict]:
    """One padded sample per record: {"text"} (loss on every token) or {"prompt", "completion"}
    (loss on the completion and `</s>`); an optional int "group" is kept."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    head = [bos] if bos is not None else []
    records = iter(records)
    while batch := [r for _, r in zip(range(chunk), records)]:
        prompted = ["prompt" in r for r in batch]
        first = _ids(tokenizer, [r["prompt"] if p else r["text"] for r, p in zip(batch, prompted)])
        second = _ids(tokenizer, [" " + r["completion"].lstrip() for r, p in zip(batch, prompted) if p])
        second_it = iter(second)
        for r, p, a in zip(batch, prompted, first):
            b = next(second_it) + [eos] if p else [eos]
            if not p:  # a plain text: every token after <s> is trained
                a, b = [], a + b
            room = seq_len - len(head) - len(b)  # what is left for the prompt
            if room < len(a):  # too long: keep the completion, cut the prompt's start
                stats.truncated += 1
                a = a[len(a) - room:] if room > 0 else []
                b = b[: seq_len - len(head)]
            ids = head + a + b
            stats.samples += 1
            stats.tokens += len(ids)
            yield _sample(ids, [0] * (len(head) + len(a)) + [1] * len(b), seq_len, pad, r.get("group"))


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of `out` to write into; rename it to `out` only on success, so an
    interrupted write never leaves a folder that looks complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: remove it or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_mds(out_dir: str | Path, samples: Iterable[dict], grouped: bool = False,
              size_limit: int = 1 << 26) -> int:
    """Write `samples` (dicts in the schema above) as MDS shards into an existing empty folder.
    Returns the number written; raises if there were none."""
    streaming = import_streaming()
    columns = dict(COLUMNS, **({"group": "int"} if grouped else {}))
    n = 0
    with streaming.MDSWriter(out=str(out_dir), columns=columns, size_limit=size_limit) as writer:
        for sample in samples:
            writer.write(sample)
            n += 1
    if n == 0:
        raise ValueError(f"no samples to write into {out_dir}: the input is empty")
    return n
