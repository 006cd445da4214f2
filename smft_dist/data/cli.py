"""`smft-data`: write MDS shards in the trainer's schema (smft_dist.data.mds).

    smft-data synthetic --out data/syn --seed 0 --n-known 300 --n-new 100 --seq-len 32
    smft-data convert dclm/*.jsonl.zst --tokenizer TOK --out data/pt --packed --seq-len 2048 --workers 8
    smft-data convert qa.jsonl --tokenizer TOK --out data/ft --seq-len 64      # loss on answers
    smft-data facts triviaqa.jsonl --tokenizer TOK --out data/triviaqa-facts --paraphrases 64
    smft-data docs pages.jsonl --tokenizer TOK --out data/simpleqa-docs --augmentations 64 --seq-len 512

Inputs: text files (one document per non-empty line), JSONL (plain, .gz or .zst) and Parquet with
{"text"}, {"question", "answer"} or {"prompt", "completion"} rows (`facts`: TriviaQA, NQ-open or
SimpleQA rows; `docs`: {"id", "text"}), or a `datasets` dataset (`--hf`: a `save_to_disk` folder,
or a hub name where a hub is reachable). Outputs are written into a temporary folder and renamed
when complete. Bad input exits with status 2 and one `error:` line naming the path and the fix.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from smft_dist.data.documents import augment, load_augmentations, split_chunks
from smft_dist.data.loader import DataError
from smft_dist.data.mds import (Encoder, WriteStats, example_samples, merge_parts, packed_samples, write_info,
                                write_mds)
from smft_dist.data.real import fact_statements, load_paraphrases, qa_rows
from smft_dist.data.sources import check_inputs, read_rows
from smft_dist.data.synthetic import SyntheticWorld
from smft_dist.data.tokenizer import (FINGERPRINT_KEY, load_tokenizer, special_token_ids, tokenizer_fingerprint,
                                      train_word_tokenizer)
from smft_dist.errors import console_script
from smft_dist.io import atomic_dir


def normalise(where: str, row: dict) -> dict:
    """One input row -> {"where", "text"} or {"where", "prompt", "completion"}; a QA row in any
    layout of smft_dist.data.real trains on its first answer."""
    if "prompt" in row and "completion" in row:
        return {"where": where, "prompt": str(row["prompt"]), "completion": str(row["completion"])}
    if "text" in row:
        return {"where": where, "text": str(row["text"])}
    if ("question" in row or "problem" in row) and "answer" in row:
        qa = qa_rows([(where, row)])[0]
        return {"where": where, "prompt": qa["prompt"], "completion": qa["answer"]}
    raise DataError(f"{where}: a row has fields {sorted(row)}; expected 'text', 'question'+'answer' "
                    f"or 'prompt'+'completion'")


def _info(tokenizer: str | Path, enc: Encoder, layout: str, stats: WriteStats, **extra) -> dict:
    """What `smft_data.json` records (the run checks data.seq_len, vocab_size and the tokenizer
    fingerprint against it)."""
    return {"layout": layout, "tokenizer": str(Path(tokenizer).resolve()),
            FINGERPRINT_KEY: tokenizer_fingerprint(enc.tokenizer), "seq_len": enc.seq_len,
            "vocab_size": enc.vocab_size, **special_token_ids(enc.tokenizer), **vars(stats), **extra}


UNKNOWN_WARN_FRACTION = 0.02  # above this share of unknown tokens the tokenizer does not cover the text


def _report(stats: WriteStats, enc: Encoder, what: str, dropped_ids: list | None = None) -> None:
    """Warnings on stderr: groups dropped by --on-long drop (their ids, when known: the first few
    here, all of them in smft_data.json's `dropped_ids`), and text the tokenizer does not cover."""
    if stats.dropped:
        named = ""
        if dropped_ids:
            shown = ", ".join(map(repr, dropped_ids[:5])) + (", ..." if len(dropped_ids) > 5 else "")
            named = f": ids {shown} (all in smft_data.json, dropped_ids)"
        print(f"smft-data: warning: dropped {stats.dropped} {what} longer than --seq-len (--on-long drop){named}; "
              f"raise --seq-len to keep them", file=sys.stderr)
    if stats.tokens and stats.unknown > UNKNOWN_WARN_FRACTION * stats.tokens:
        print(f"smft-data: warning: {100 * stats.unknown / stats.tokens:.1f}% of the tokens written ({stats.unknown} "
              f"of {stats.tokens}) are the tokenizer's unknown token {enc.tokenizer.unk_token!r}: the tokenizer does "
              f"not cover this text; pass the model's own tokenizer (--tokenizer)", file=sys.stderr)


def _convert_part(args, k: int, n: int, out: Path, remote: str | None) -> dict:
    """Tokenize part k of n of the input into the MDS folder `out` (a worker's job)."""
    enc = Encoder(load_tokenizer(args.tokenizer), args.seq_len, args.vocab_size)
    stats = WriteStats()
    rows = read_rows(args.inputs, args.hf, args.hf_config, args.split, part=(k, n))
    records = (normalise(where, row) for where, row in rows)
    if args.packed:
        texts = ((r["where"], r["text"] if "text" in r else f"{r['prompt']} {r['completion']}") for r in records)
        samples = packed_samples(enc, texts, stats)
    else:
        samples = example_samples(enc, ([r] for r in records), stats, args.on_long)
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_mds(out, samples, remote=remote, progress=f"part {k + 1}/{n}" if n > 1 else "convert")
    except DataError:
        raise
    except ValueError as e:  # no samples
        if n == 1 or stats.dropped:
            raise DataError(f"{', '.join(args.inputs) or args.hf}: {e}") from None
        shutil.rmtree(out)  # more workers than blocks of rows: this part is empty
    return vars(stats)


def convert(args) -> dict:
    check_inputs(args.inputs, args.hf)
    if args.workers < 1:
        raise DataError(f"--workers {args.workers}: must be >= 1")
    enc = Encoder(load_tokenizer(args.tokenizer), args.seq_len, args.vocab_size)  # fail fast on the tokenizer
    t0 = time.perf_counter()
    with atomic_dir(args.out, args.overwrite) as tmp:
        if args.workers == 1:
            parts = [_convert_part(args, 0, 1, tmp, args.remote)]
        else:
            remote = lambda k: args.remote and f"{args.remote.rstrip('/')}/part_{k:03d}"  # noqa: E731
            with ProcessPoolExecutor(args.workers, mp_context=get_context("fork")) as pool:
                futures = [pool.submit(_convert_part, args, k, args.workers, tmp / f"part_{k:03d}", remote(k))
                           for k in range(args.workers)]
                parts = [f.result() for f in futures]
            if not any(p["samples"] for p in parts):
                raise DataError(f"no samples to write into {args.out}: the input is empty")
            merge_parts(tmp, args.remote)
        stats = WriteStats(**{key: sum(p[key] for p in parts) for key in parts[0]})
        seconds = time.perf_counter() - t0
        result = _info(args.tokenizer, enc, "packed" if args.packed else "examples", stats, workers=args.workers,
                       seconds=round(seconds, 3), tokens_per_s=round(stats.tokens / seconds, 1))
        write_info(tmp, **result)
    _report(stats, enc, "examples")
    return result


def _write_groups(args, tmp: Path, enc: Encoder, groups: list[list[dict]],
                  what: str) -> tuple[WriteStats, list[int], list[int]]:
    """The grouped MDS of `facts`/`docs` into tmp/train, one group after the other -> (stats, the
    indices of the groups written: the group id written for groups[kept[k]] is k, the indices of
    the groups dropped by --on-long drop)."""
    stats = WriteStats()
    (tmp / "train").mkdir()
    write_mds(tmp / "train", example_samples(enc, groups, stats, args.on_long), grouped=True, progress=what)
    dropped = {g for g, group in enumerate(groups) if group[0].get("dropped")}
    return stats, [g for g in range(len(groups)) if g not in dropped], sorted(dropped)


def _texts_per_group(items: list[dict], n: int, user: dict | None, make, what: str, flag: str) -> list[list[str]]:
    """`n` texts for each item: from the user's file (the first n of its list) or `make(item, n)`."""
    if user is None:
        return [make(item, n) for item in items]
    user = {str(k): v for k, v in user.items()}
    out = []
    for item in items:
        texts = user.get(str(item["id"]))
        if texts is None:
            raise DataError(f"{flag}: no entry for {what} id {item['id']!r}: give every {what} its texts")
        if len(texts) < n:
            raise DataError(f"{flag}: {what} id {item['id']!r} has {len(texts)} texts, fewer than {n}: every group "
                            f"needs the same count (one group per global batch); lower the count to {len(texts)}")
        out.append(texts[:n])
    return out


def facts(args) -> dict:
    check_inputs(args.inputs, args.hf)
    enc = Encoder(load_tokenizer(args.tokenizer), args.seq_len, args.vocab_size)
    rows = read_rows(args.inputs, args.hf, args.hf_config, args.split)
    qa = qa_rows(itertools.islice(rows, args.limit))
    if not qa:
        raise DataError(f"no QA rows in {', '.join(args.inputs) or args.hf}: the input is empty")
    user = load_paraphrases(args.paraphrases_file) if args.paraphrases_file else None
    texts = _texts_per_group(qa, args.paraphrases, user, lambda q, n: fact_statements(q, n, args.seed), "fact",
                             "--paraphrases-file")
    groups = [[{"where": f"{q['source']} (fact {q['id']!r}, paraphrase {j})", "text": t, "group": g}
               for j, t in enumerate(ts)] for g, (q, ts) in enumerate(zip(qa, texts))]
    with atomic_dir(args.out, args.overwrite) as tmp:
        stats, kept, dropped = _write_groups(args, tmp, enc, groups, "facts")
        with open(tmp / "qa.jsonl", "w") as f:  # evaluation: the facts that were written, every answer
            f.writelines(json.dumps(dict(qa[g], group=k)) + "\n" for k, g in enumerate(kept))
        with open(tmp / "statements.jsonl", "w") as f:
            f.writelines(json.dumps({"id": qa[g]["id"], "group": k, "paraphrases": texts[g]}) + "\n"
                         for k, g in enumerate(kept))
        dropped_ids = [qa[g]["id"] for g in dropped]
        info = _info(args.tokenizer, enc, "facts", stats, groups=len(kept), paraphrases=args.paraphrases,
                     dropped_ids=dropped_ids)
        write_info(tmp / "train", **info)
    _report(stats, enc, "facts", dropped_ids)
    return info


def docs(args) -> dict:
    check_inputs(args.inputs, None)
    enc = Encoder(load_tokenizer(args.tokenizer), args.seq_len, args.vocab_size)
    count = lambda text: len(enc.ids([text], ["a chunk"])[0])  # noqa: E731
    chunks = []
    for where, row in read_rows(args.inputs):
        if "text" not in row:
            raise DataError(f"{where}: a document has fields {sorted(row)}; expected {{\"id\", \"text\"}}")
        chunks += split_chunks(row.get("id", where), str(row["text"]), count, args.chunk_tokens)
    if not chunks:
        raise DataError(f"no documents in {', '.join(args.inputs)}: the input is empty")
    user = load_augmentations(args.augmentations_file) if args.augmentations_file else None
    texts = _texts_per_group(chunks, args.augmentations, user, lambda c, n: augment(c, n, args.seed), "chunk",
                             "--augmentations-file")
    groups = [[{"where": f"chunk {c['id']!r} augmentation {j}", "text": t, "group": g} for j, t in enumerate(ts)]
              for g, (c, ts) in enumerate(zip(chunks, texts))]
    with atomic_dir(args.out, args.overwrite) as tmp:
        stats, kept, dropped = _write_groups(args, tmp, enc, groups, "chunks")
        with open(tmp / "chunks.jsonl", "w") as f:
            f.writelines(json.dumps(dict(chunks[g], group=k, augmentations=texts[g])) + "\n"
                         for k, g in enumerate(kept))
        dropped_ids = [chunks[g]["id"] for g in dropped]
        info = _info(args.tokenizer, enc, "docs", stats, groups=len(kept), augmentations=args.augmentations,
                     chunk_tokens=args.chunk_tokens, dropped_ids=dropped_ids)
        write_info(tmp / "train", **info)
    _report(stats, enc, "chunks", dropped_ids)
    return info


def write_synthetic(out: str | Path, world: SyntheticWorld, seq_len: int, overwrite: bool = False) -> dict:
    """Write the whole synthetic benchmark into `out` (layout in `smft-data synthetic --help`)."""
    meta = {"seed": world.seed, "n_known": world.n_known, "n_new": world.n_new, "paraphrases": world.paraphrases,
            "seq_len": seq_len, "qa_people_fraction": world.qa_people_fraction,
            "qa_rewrites": world.qa_rewrites, "n_docs": world.n_docs, "format": "smft-mds-v1"}
    with atomic_dir(out, overwrite) as tmp:
        tok = train_word_tokenizer(world.vocabulary_texts(documents=world.n_docs > 0), tmp / "tokenizer")
        enc = Encoder(tok, seq_len)
        meta["vocab_size"] = len(tok)
        corpora = {"pretrain": world.pretrain_corpus(), "background": world.background_corpus(),
                   "heldout": world.heldout_corpus()}
        for name, texts in corpora.items():
            stats = WriteStats()
            documents = ((f"{name} document {i}", t) for i, t in enumerate(texts))
            write_mds(tmp / name, packed_samples(enc, documents, stats))
            write_info(tmp / name, **_info(Path(out) / "tokenizer", enc, "packed", stats))
            meta[name] = dict(vars(stats), documents=len(texts))
        groups = ([{"where": f"new fact {i} paraphrase {j}", "text": s, "group": i} for j, s in enumerate(para)]
                  for i, para in enumerate(world.new_fact_statements()))
        stats = WriteStats()
        write_mds(tmp / "new_facts", example_samples(enc, groups, stats), grouped=True)
        write_info(tmp / "new_facts", **_info(Path(out) / "tokenizer", enc, "facts", stats,
                                              groups=world.n_new, paraphrases=world.paraphrases))
        meta["new_facts"] = vars(stats)
        (tmp / "eval").mkdir()
        if world.n_docs:  # document QA: `smft-data docs` chunks and augments documents/new_documents.jsonl
            (tmp / "documents").mkdir()
            for name, rows in (("new_documents", world.new_documents()),
                               ("augmentations", world.document_augmentations(world.paraphrases))):
                with open(tmp / "documents" / f"{name}.jsonl", "w") as f:
                    f.writelines(json.dumps(d) + "\n" for d in rows)
        qa_sets = {"known_qa": world.known_qa(), "new_qa": world.new_qa(), **({"doc_qa": world.doc_qa()} if world.n_docs else {})}
        for name, qa in qa_sets.items():
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
                                   "fact index), OUT/eval/{known_qa,new_qa,doc_qa}.jsonl and OUT/meta.json; "
                                   "with --n-docs, OUT/documents/{new_documents,augmentations}.jsonl for `smft-data docs` "
                                   "(--augmentations-file; one paragraph = one chunk at --chunk-tokens 40).")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-known", type=int, default=300)
    s.add_argument("--n-new", type=int, default=1000)
    s.add_argument("--paraphrases", type=int, default=64)
    s.add_argument("--n-docs", type=int, default=0, help="documents about further new people (document QA)")
    s.add_argument("--pretrain-docs", type=int, default=20000)
    s.add_argument("--background-docs", type=int, default=2000)
    s.add_argument("--heldout-docs", type=int, default=500)
    s.add_argument("--seq-len", type=int, default=32)
    s.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("convert", help="tokenize text/JSONL/Parquet/datasets into MDS (pretraining or examples)",
                       description="Writes OUT (MDS + smft_data.json). With --workers N, N processes tokenize "
                                   "disjoint blocks of rows into OUT/part_*/ and one index.json is merged over them.")
    _inputs(c, hf=True)
    _writing(c, seq_len=64)
    c.add_argument("--packed", action="store_true", help="pretraining layout (else one padded example per row)")
    c.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    c.add_argument("--remote", help="also upload the shards here (s3://..., gs://..., or a folder); --out is "
                                    "the local copy")
    f = sub.add_parser("facts", help="QA rows (TriviaQA, NQ-open, SimpleQA) -> fact-learning groups",
                       description="Writes OUT/train (MDS: one sample per paraphrase, the paraphrases of a fact "
                                   "consecutive, column group = the fact's row index), OUT/qa.jsonl (every "
                                   "accepted answer, for F1), OUT/statements.jsonl.")
    _inputs(f, hf=True)
    _writing(f, seq_len=64)
    f.add_argument("--paraphrases", type=int, default=64, help="statements per fact (one global batch each)")
    f.add_argument("--paraphrases-file", help='JSONL of {"id", "paraphrases": [...]} (e.g. written by an LM); '
                                              "ids: TriviaQA question_id, else the row's 0-based index")
    f.add_argument("--limit", type=int, help="only the first N rows (the paper learns 1,000 TriviaQA facts)")
    f.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("docs", help='documents {"id", "text"} -> chunks with augmentations (document QA)',
                       description="Writes OUT/train (MDS: one group per chunk, its augmentations consecutive) "
                                   "and OUT/chunks.jsonl.")
    _inputs(d, hf=False)
    _writing(d, seq_len=512)
    d.add_argument("--chunk-tokens", type=int, default=256, help="at most this many tokens per chunk")
    d.add_argument("--augmentations", type=int, default=64, help="texts per chunk (one global batch each)")
    d.add_argument("--augmentations-file", help='JSONL of {"id": "<doc id>#<k>", "augmentations": [...]}')
    d.add_argument("--seed", type=int, default=0)
    return p


def _inputs(p: argparse.ArgumentParser, hf: bool) -> None:
    p.add_argument("inputs", nargs="*", help="input files (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet)")
    if hf:
        p.add_argument("--hf", help="a datasets folder (save_to_disk) or hub name")
        p.add_argument("--hf-config")
        p.add_argument("--split", default="train")


def _writing(p: argparse.ArgumentParser, seq_len: int) -> None:
    p.add_argument("--tokenizer", required=True, help="any Hugging Face tokenizer folder (the model's)")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sample (data.seq_len of the run)")
    p.add_argument("--vocab-size", type=int, help="the model's vocab_size: every token id must be below it "
                                                  "(default: the tokenizer's size)")
    p.add_argument("--on-long", choices=("error", "drop"), default="error",
                   help="an example longer than --seq-len: fail naming it (default), or drop it (its whole "
                        "group) with a warning naming them (all their ids in smft_data.json)")
    p.add_argument("--overwrite", action="store_true")


@console_script
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seq_len < 4:
        raise DataError(f"--seq-len {args.seq_len} is too small: use at least 4")
    for flag in ("vocab_size", "limit", "paraphrases", "augmentations", "chunk_tokens"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    if args.command == "synthetic":
        try:
            world = SyntheticWorld(seed=args.seed, n_known=args.n_known, n_new=args.n_new,
                                   paraphrases=args.paraphrases, pretrain_docs=args.pretrain_docs,
                                   background_docs=args.background_docs, heldout_docs=args.heldout_docs,
                                   n_docs=args.n_docs)
        except ValueError as e:  # the world's own checks of its sizes name the option
            raise DataError(str(e)) from None
        result = write_synthetic(args.out, world, args.seq_len, args.overwrite)
    else:
        result = {"convert": convert, "facts": facts, "docs": docs}[args.command](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
