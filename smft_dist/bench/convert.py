"""Benchmark `smft-data convert --packed` (a pretraining corpus to MDS): tokens/s at 1..N workers.

    python -m smft_dist.bench.convert --docs 20000 --workers 1,2 --json benchmarks/results/convert.json

Generates a DCLM-shaped corpus (JSONL.zst, {"text"} documents of ~`--sentences` filler sentences
from the synthetic world's grammar, seeded), trains a byte-level BPE tokenizer of `--vocab` tokens
on it (a stand-in for a Hugging Face tokenizer folder), then runs the real `convert` command at
each worker count on the same input, alternating the counts over `--repeats` rounds. Reported:
tokens written per wall-clock second (median over rounds) and the speed-up over 1 worker.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from smft_dist.data.synthetic import SyntheticWorld


def make_corpus(path: Path, docs: int, sentences: int, seed: int = 0) -> None:
    import zstandard

    rng = random.Random(seed)
    with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        for _ in range(docs):
            text = " ".join(SyntheticWorld._filler(rng) for _ in range(sentences))
            f.write((json.dumps({"text": text}) + "\n").encode())


def train_bpe(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from smft_dist.data.sources import read_rows

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"])
    tok.train_from_iterator((row["text"] for _, row in read_rows([str(corpus)])), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(out))


def main(argv=None) -> dict:
    from smft_dist.data.cli import main as smft_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--sentences", type=int, default=20)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: workers are the parallelism
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "corpus.jsonl.zst", args.docs, args.sentences)
        train_bpe(tmp / "corpus.jsonl.zst", tmp / "tok", args.vocab)
        runs: dict[int, list[dict]] = {w: [] for w in counts}
        for r in range(args.repeats):
            for w in counts:
                out = tmp / f"out_{w}_{r}"
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    rc = smft_data(["convert", str(tmp / "corpus.jsonl.zst"), "--tokenizer", str(tmp / "tok"),
                                    "--out", str(out), "--packed", "--seq-len", str(args.seq_len), "--workers", str(w)])
                assert rc == 0, f"convert failed at {w} workers"
                runs[w].append(json.loads(buf.getvalue().splitlines()[-1]))
    tokens = runs[counts[0]][0]["tokens"]
    result = {"docs": args.docs, "sentences_per_doc": args.sentences, "tokens": tokens, "vocab": args.vocab,
              "seq_len": args.seq_len, "cpu_count": os.cpu_count(), "repeats": args.repeats,
              "workers": {str(w): {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[w]),
                                   "seconds": statistics.median(x["seconds"] for x in runs[w])} for w in counts}}
    base = result["workers"][str(counts[0])]["tokens_per_s"]
    for w in counts:
        result["workers"][str(w)]["speedup_vs_1"] = round(result["workers"][str(w)]["tokens_per_s"] / base, 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
