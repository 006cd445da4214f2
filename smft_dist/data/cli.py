"""`smft-data`: write MDS shards in the trainer's schema (smft_dist.data.mds).

    smft-data synthetic --out data/syn --seed 0 --n-known 300 --n-new 100 --seq-len 32
    smft-data convert corpus.txt more.jsonl --tokenizer data/syn/tokenizer --out data/pt --packed
    smft-data convert qa.jsonl --tokenizer TOK --out data/ft --seq-len 64      # loss on answers
    smft-data convert --hf path/to/saved_dataset --split train --tokenizer TOK --out data/x

Inputs: text files (one document per non-empty line), JSONL with {"text"}, {"question", "answer"}
or {"prompt", "completion"} per line, or a `datasets` dataset (a `save_to_disk` folder, or a hub
name when a hub is reachable) with the same fields. Outputs are written into a temporary folder and
renamed when complete. Bad input exits with status 2 and a message naming the path and the fix.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

from smft_dist.data.mds import WriteStats, atomic_dir, example_samples, packed_samples, write_mds
from smft_dist.data.synthetic import SyntheticWorld, qa_prompt
from smft_dist.data.tokenizer import load_tokenizer, train_word_tokenizer


class DataError(ValueError):
    """Bad input: the message names the path and the fix."""


def normalise(row: dict, where: str) -> dict:
    """One input row -> {"text"} or {"prompt", "completion"}."""
    if "prompt" in row and "completion" in row:
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    if "question" in row and "answer" in row:
        answer = row["answer"]
        answer = answer[0] if isinstance(answer, (list, tuple)) and answer else answer
        return {"prompt": qa_prompt(str(row["question"])), "completion": str(answer)}
    if "text" in row:
        return {"text": str(row["text"])}
    raise DataError(f"{where}: a row has fields {sorted(row)}; expected 'text', 'question'+'answer' "
                    f"or 'prompt'+'completion'")


def read_records(inputs: list[str], hf: str | None, hf_config: str | None, split: str) -> Iterator[dict]:
    if hf is not None:
        import datasets

        if Path(hf).is_dir():
            ds = datasets.load_from_disk(hf)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{hf}: no split {split!r} (has {list(ds)}): pass --split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(hf, hf_config, split=split)
        for row in ds:
            yield normalise(row, hf)
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file: check the path")
        if path.suffix in (".jsonl", ".json"):
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{i}: not a JSON object ({e}): write one object per line") from None
                        yield normalise(row, f"{path}:{i}")
        elif path.suffix in (".txt", ".text", ".md", ""):
            with open(path) as f:
                yield from ({"text": line.strip()} for line in f if line.strip())
        else:
            raise DataError(f"input {path}: unknown format {path.suffix!r}: use .txt (one document per line) "
                            f"or .jsonl, or --hf for a datasets folder")


def convert(args) -> dict:
    if not args.inputs and args.hf is None:
        raise DataError("no input: pass text/JSONL files or --hf DATASET")
    tok = load_tokenizer(args.tokenizer)
    stats = WriteStats()
    records = read_records(args.inputs, args.hf, args.hf_config, args.split)
    with atomic_dir(args.out, args.overwrite) as tmp:
        if args.packed:
            texts = (r["text"] if "text" in r else f"{r['prompt']} {r['completion']}" for r in records)
            samples = packed_samples(tok, texts, args.seq_len, stats)
        else:
            samples = example_samples(tok, records, args.seq_len, stats)
        try:
            write_mds(tmp, samples)
        except ValueError as e:
            raise DataError(f"{', '.join(args.inputs) or args.hf}: {e}") from None
    return vars(stats)


def write_synthetic(out: str | Path, world: SyntheticWorld, seq_len: int, overwrite: bool = False) -> dict:
    """Write the whole synthetic benchmark into `out` (layout in `smft-data synthetic --help`)."""
    meta = {"seed": world.seed, "n_known": world.n_known, "n_new": world.n_new, "paraphrases": world.paraphrases,
            "seq_len": seq_len, "format": "smft-mds-v1"}
    with atomic_dir(out, overwrite) as tmp:
        tok = train_word_tokenizer(world.vocabulary_texts(), tmp / "tokenizer")
        meta["vocab_size"] = len(tok)
        corpora = {"pretrain": world.pretrain_corpus(), "background": world.background_corpus(),
                   "heldout": world.heldout_corpus()}
        for name, texts in corpora.items():
            stats = WriteStats()
            write_mds(tmp / name, packed_samples(tok, texts, seq_len, stats))
            meta[name] = dict(vars(stats), documents=len(texts))
        records = ({"text": s, "group": i} for i, para in enumerate(world.new_fact_statements()) for s in para)
        stats = WriteStats()
        write_mds(tmp / "new_facts", example_samples(tok, records, seq_len, stats), grouped=True)
        if stats.truncated:
            raise DataError(f"{stats.truncated} new-fact statements exceed --seq-len {seq_len}: raise --seq-len")
        meta["new_facts"] = vars(stats)
        (tmp / "eval").mkdir()
        for name, qa in (("known_qa", world.known_qa()), ("new_qa", world.new_qa())):
            with open(tmp / "eval" / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(q) + "\n" for q in qa)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smft-data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="write the synthetic knowledge benchmark",
                       description="Writes OUT/{tokenizer, pretrain, background, heldout} (packed MDS), "
                                   "OUT/new_facts (one sample per paraphrase, fact order, column group = "
                                   "fact index), OUT/eval/{known_qa,new_qa}.jsonl and OUT/meta.json.")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-known", type=int, default=300)
    s.add_argument("--n-new", type=int, default=1000)
    s.add_argument("--paraphrases", type=int, default=64)
    s.add_argument("--pretrain-docs", type=int, default=20000)
    s.add_argument("--background-docs", type=int, default=2000)
    s.add_argument("--heldout-docs", type=int, default=500)
    s.add_argument("--seq-len", type=int, default=32)
    s.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("convert", help="tokenize text/JSONL/datasets into MDS")
    c.add_argument("inputs", nargs="*", help="text (.txt) or JSONL (.jsonl) files")
    c.add_argument("--hf", help="a datasets folder (save_to_disk) or hub name")
    c.add_argument("--hf-config")
    c.add_argument("--split", default="train")
    c.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder")
    c.add_argument("--out", required=True)
    c.add_argument("--seq-len", type=int, default=64)
    c.add_argument("--packed", action="store_true", help="pretraining layout (else one padded example per row)")
    c.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seq_len < 4:
        print(f"smft-data: error: --seq-len {args.seq_len} is too small: use at least 4", file=sys.stderr)
        return 2
    try:
        if args.command == "synthetic":
            world = SyntheticWorld(seed=args.seed, n_known=args.n_known, n_new=args.n_new,
                                   paraphrases=args.paraphrases, pretrain_docs=args.pretrain_docs,
                                   background_docs=args.background_docs, heldout_docs=args.heldout_docs)
            result = write_synthetic(args.out, world, args.seq_len, args.overwrite)
        else:
            result = convert(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # DataError, size checks, paths
        print(f"smft-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
