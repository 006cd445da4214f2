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
  Paraphrases of one fact (or augmentations of one chunk) are consecutive samples sharing a
  `group`; each is padded to L on its own, so no paraphrase can attend to (copy from) another.

Every token id is checked against the model's vocab_size while writing (`Encoder`).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from smft_dist.data.loader import DataError
from smft_dist.data.streaming_compat import import_streaming
from smft_dist.errors import reason

INFO_FILE = "smft_data.json"
COLUMNS = {"input_ids": "ndarray:int32", "attention_mask": "ndarray:uint8", "loss_mask": "ndarray:uint8"}


@dataclass
class WriteStats:
    samples: int = 0
    tokens: int = 0  # non-padding tokens
    dropped: int = 0  # groups (examples) dropped for being longer than seq_len (--on-long drop)
    unknown: int = 0  # tokens written that are the tokenizer's unknown token (text it does not cover)


class Encoder:
    """Tokenizes texts and checks every id against the model's `vocab_size` (default: the
    tokenizer's size), naming the offending text. bos/eos/pad come from the tokenizer; `unk` is
    its unknown token's id, None when it has none (byte-level BPE) or it doubles as bos/eos/pad."""

    def __init__(self, tokenizer, seq_len: int, vocab_size: int | None = None):
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.vocab_size = vocab_size or len(tokenizer)
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        if self.eos is None or self.pad is None:
            raise DataError("the tokenizer has no eos token (and so no pad token): use a tokenizer with an eos token")
        for name, i in (("bos", self.bos), ("eos", self.eos), ("pad", self.pad)):
            if i is not None and i >= self.vocab_size:
                raise DataError(f"the tokenizer's {name} id {i} >= vocab_size {self.vocab_size}: use the model's "
                                f"tokenizer or a model with a larger vocab_size")
        self.head = [self.bos] if self.bos is not None else []
        unk = getattr(tokenizer, "unk_token_id", None)
        self.unk = unk if unk not in (self.bos, self.eos, self.pad) else None

    def ids(self, texts: list[str], wheres: list[str]) -> list[list[int]]:
        out = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for ids, where in zip(out, wheres):
            if ids and max(ids) >= self.vocab_size:
                bad = max(ids)
                raise DataError(f"{where}: token id {bad} ({self.tokenizer.convert_ids_to_tokens(bad)!r}) is >= "
                                f"vocab_size {self.vocab_size}: the tokenizer does not match the model; use the "
                                f"model's tokenizer or raise --vocab-size / model.vocab_size")
        return out


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


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := [x for _, x in zip(range(size), items)]:
        yield chunk


def packed_samples(enc: Encoder, texts: Iterable[tuple[str, str]], stats: WriteStats,
                   chunk: int = 4096) -> Iterator[dict]:
    """`<s> text </s>` for each (where, text), concatenated and cut into `seq_len` chunks (a
    document may be split across samples: that is how pretraining corpora are packed)."""
    L = enc.seq_len
    buf: list[int] = []
    for batch in _chunks(texts, chunk):
        for ids in enc.ids([t for _, t in batch], [w for w, _ in batch]):
            buf += enc.head + ids + [enc.eos]
        while len(buf) >= L:
            stats.samples += 1
            stats.tokens += L
            stats.unknown += buf[:L].count(enc.unk)
            yield _sample(buf[:L], [1] * L, L, enc.pad, None)
            buf = buf[L:]
    if buf:  # the tail, padded
        stats.samples += 1
        stats.tokens += len(buf)
        stats.unknown += buf.count(enc.unk)
        yield _sample(buf, [1] * len(buf), L, enc.pad, None)


def example_samples(enc: Encoder, groups: Iterable[list[dict]], stats: WriteStats, on_long: str = "error",
                    chunk: int = 4096) -> Iterator[dict]:
    """One right-padded sample per record, group after group. A record is {"where", "text"} (loss
    on every token) or {"where", "prompt", "completion"} (loss on the completion and `</s>`), with
    an optional "group" (any value: it marks grouped records). An example longer than `seq_len` is
    never cut (a cut statement or answer trains on nothing useful): `on_long="error"` raises naming
    it and the length it needs, `"drop"` drops its whole group, counts it in `stats.dropped` and
    marks its records `"dropped": True`. The `group` column written numbers the groups written
    0, 1, 2, ... in order: a dropped group takes no id, so group k is still the (k+1)-th fact a
    one-group-per-step finetune learns (`smft-patch --groups k` is its step k+1)."""
    if on_long not in ("error", "drop"):
        raise ValueError(f"on_long={on_long!r}: use 'error' or 'drop'")
    L = enc.seq_len
    written_groups = 0
    for batch in _chunks(groups, max(1, chunk)):
        records = [r for g in batch for r in g]
        prompted = ["prompt" in r for r in records]
        wheres = [r["where"] for r in records]
        first = enc.ids([r["prompt"] if p else r["text"] for r, p in zip(records, prompted)], wheres)
        second = iter(enc.ids([" " + r["completion"].lstrip() for r, p in zip(records, prompted) if p],
                              [w for w, p in zip(wheres, prompted) if p]))
        encoded = iter(zip(records, prompted, first))
        for group in batch:
            parts = []
            for _ in group:
                r, p, a = next(encoded)
                b = next(second) + [enc.eos] if p else a + [enc.eos]
                a = a if p else []  # a plain text: every token after <s> is trained
                parts.append((r, enc.head + a + b, len(enc.head) + len(a)))
            too_long = [(r, len(ids)) for r, ids, _ in parts if len(ids) > L]
            if too_long:
                if on_long == "drop":
                    stats.dropped += 1
                    for r in group:
                        r["dropped"] = True  # the caller learns which groups were written
                    continue
                (r, need) = too_long[0]
                what = "the example" if len(group) == 1 else f"the example (group {r.get('group')})"
                raise DataError(f"{r['where']}: {what} needs {need} tokens but --seq-len is {L}: raise --seq-len "
                                f"to at least {need}, or pass --on-long drop to skip such examples "
                                f"({'and their whole group' if len(group) > 1 else 'counted in the output'})")
            for r, ids, n_prompt in parts:
                stats.samples += 1
                stats.tokens += len(ids)
                stats.unknown += ids.count(enc.unk)
                group_id = written_groups if r.get("group") is not None else None
                yield _sample(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt), L, enc.pad, group_id)
            written_groups += 1


def write_mds(out_dir: str | Path, samples: Iterable[dict], grouped: bool = False,
              size_limit: int = 1 << 26, remote: str | None = None, progress: str | None = None) -> int:
    """Write `samples` (dicts in the schema above) as MDS shards into an existing empty folder,
    and also to `remote` (a URI MDSWriter can upload to, or another folder) if given. With
    `progress` (a label), shows a tqdm bar on a terminal, else a log line every 30 s.
    Returns the number written; raises if there were none."""
    streaming = import_streaming()
    columns = dict(COLUMNS, **({"group": "int"} if grouped else {}))
    out = (str(out_dir), remote) if remote else str(out_dir)
    n = 0
    # Shard hashes in index.json make the index a fingerprint of the samples (the loader's dataset id).
    with streaming.MDSWriter(out=out, columns=columns, size_limit=size_limit, keep_local=True,
                             hashes=["xxh3_64"]) as writer:
        for sample in _with_progress(samples, progress) if progress else samples:
            writer.write(sample)
            n += 1
    if n == 0:
        raise ValueError(f"no samples to write into {out_dir}: the input is empty")
    return n


def merge_parts(out_dir: str | Path, remote: str | None = None) -> None:
    """One index.json over the `part_*` sub-folders of `out_dir` (written by parallel workers),
    uploaded to `remote` too if given (mosaicml-streaming's merge_index)."""
    from streaming.base.util import merge_index

    import_streaming()
    merge_index((str(out_dir), remote) if remote else str(out_dir), keep_local=True)


def write_info(out_dir: str | Path, **info) -> None:
    """`smft_data.json` beside index.json: how the shards were made (tokenizer, seq_len, vocab_size,
    special ids, counts). Written after any index merge, which would take it for a part's index."""
    (Path(out_dir) / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def read_info(mds_dir: str | Path) -> dict | None:
    """The `smft_data.json` of a local MDS folder (None if absent; a DataError naming it if damaged)."""
    f = Path(mds_dir) / INFO_FILE
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise DataError(f"{f} is unreadable ({reason(e)}): write the data again with `smft-data`") from None
    if not isinstance(info, dict):
        raise DataError(f"{f} is not an smft_data.json (a JSON object): write the data again with `smft-data`")
    return info


def _with_progress(samples: Iterable[dict], label: str, every_s: float = 30.0) -> Iterator[dict]:
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(samples, desc=label, unit=" samples")
        return
    last = time.monotonic()
    for n, sample in enumerate(samples, 1):
        yield sample
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            print(f"smft-data: {label}: {n} samples written", file=sys.stderr, flush=True)
