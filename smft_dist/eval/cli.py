"""`smft-eval`: evaluate a checkpoint (written at any world size) or an exported Hugging Face folder.

    smft-eval runs/x/checkpoints --qa nq_open.jsonl --qa data/tq/qa.jsonl \
        --nll data/heldout --lm-eval hellaswag,gsm8k --json runs/x/eval.json

- `--qa FILE`: closed-book QA F1 / exact match (greedy answers; the best over every accepted
  answer) on a JSONL in any layout `load_qa_jsonl` reads (TriviaQA, NQ-open, SimpleQA, converted);
- `--nll MDS`: held-out NLL per token on an MDS folder or URI;
- `--lm-eval TASKS`: lm-evaluation-harness tasks (the optional `lmeval` extra), `--lm-eval-include
  DIR` for task YAML of your own.

Prints a table and writes everything (with each QA prediction) as JSON. The same as Python:

    model, tok = load_eval_model("runs/x/checkpoints", tokenizer="TOK")
    results = evaluate_model(model, tok, qa=["nq_open.jsonl"], nll=["data/heldout"])

One process; the whole memory table is loaded (checkpoint shards of any layout are joined).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smft_dist.config import check_mds_folder
from smft_dist.data.loader import DataError
from smft_dist.data.sources import check_inputs
from smft_dist.errors import console_script
from smft_dist.eval.lm_eval_adapter import run_lm_eval
from smft_dist.eval.nll import mds_heldout_nll
from smft_dist.eval.qa import evaluate_qa, load_qa_jsonl


def _run_tokenizer(step_dir: Path, saved: str | None) -> Path | None:
    """The tokenizer in-run evaluation used (`run_tokenizer_folder`): the checkpoint's
    model.tokenizer, else that of the data of the run that wrote it (its `<out_dir>/config.yaml`,
    beside `<out_dir>/checkpoints/step_N`)."""
    from smft_dist.config import ConfigError, data_source, load_config
    from smft_dist.data.tokenizer import run_tokenizer_folder

    data = None
    run_config = step_dir.parent.parent / "config.yaml"
    if run_config.is_file():
        try:
            data = data_source(load_config(run_config))[1]
        except ConfigError:  # a config of an older version: the run's data stays unknown
            pass
    return run_tokenizer_folder(saved, data)


def _tokenizer_source(path: Path, tokenizer: str | None, step_dir: Path | None, saved: str | None) -> str:
    own = path if (path / "tokenizer_config.json").is_file() else None
    for candidate in (tokenizer, own, step_dir and _run_tokenizer(step_dir, saved)):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    raise DataError(f"no tokenizer for {path}: pass --tokenizer (a Hugging Face tokenizer folder; the checkpoint "
                    f"names {saved!r} in model.tokenizer)" if saved else
                    f"no tokenizer for {path}: pass --tokenizer (a Hugging Face tokenizer folder; neither the "
                    f"checkpoint's model.tokenizer nor the data of the run that wrote it names one)")


def load_eval_model(path: str | Path, tokenizer: str | None = None, device: str | None = None):
    """-> (model in eval mode on `device`, tokenizer) from a checkpoint folder (`<out_dir>/checkpoints`
    or one `step_N`, any world size) or an exported HF folder. The tokenizer: `tokenizer`, else the
    folder's own, else the one in-run evaluation used: the checkpoint's model.tokenizer, else the
    one its run's data was written with."""
    import smft_dist.model  # noqa: F401  (registers the "smft" model type)
    from smft_dist.checkpoint import layout as ckpt
    from smft_dist.data.tokenizer import check_tokenizer_of_checkpoint, load_tokenizer

    path = Path(path)
    if not path.exists():
        raise DataError(f"model {path} does not exist: pass a checkpoint folder or an exported Hugging Face folder")
    saved_tokenizer = step_dir = None
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        from smft_dist.checkpoint.model import load_hf_model

        model = load_hf_model(path)
    else:
        from smft_dist.checkpoint.model import load_checkpoint_model

        model, step_dir = load_checkpoint_model(path)
        saved_tokenizer = ckpt.read_meta(step_dir).get("model", {}).get("tokenizer")
    source = _tokenizer_source(path, tokenizer, step_dir, saved_tokenizer)
    tok = load_tokenizer(source)
    if step_dir is not None:
        check_tokenizer_of_checkpoint(tok, f"the tokenizer {source}", ckpt.read_meta(step_dir), step_dir)
    if len(tok) > model.config.vocab_size:
        raise DataError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {model.config.vocab_size}: "
                        f"pass the tokenizer the model was trained with (--tokenizer)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tok


def evaluate_model(model, tokenizer, qa: list[str] = (), nll: list[str] = (), lm_eval: list[str] = (), *,
                   batch_size: int = 32, max_new_tokens: int = 16, nll_batches: int | None = None,
                   lm_eval_include: str | None = None, lm_eval_limit: int | None = None) -> dict:
    """{"qa": {file: {"f1", "exact_match", "n", "predictions"}}, "nll": {folder: {"nll", "ppl",
    "tokens"}}, "lm_eval": {task: {metric: value}}}."""
    out: dict = {"qa": {}, "nll": {}, "lm_eval": {}}
    for f in qa:
        rows = load_qa_jsonl(f)
        res = evaluate_qa(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
        for p in res["predictions"]:
            p["id"] = rows[p["index"]]["id"]
        out["qa"][str(f)] = res
    for d in nll:
        out["nll"][str(d)] = mds_heldout_nll(model, str(d), batch_size=batch_size, max_batches=nll_batches)
    if lm_eval:
        out["lm_eval"] = run_lm_eval(model, tokenizer, list(lm_eval), include_path=lm_eval_include,
                                     limit=lm_eval_limit, batch_size=batch_size)
    return out


def table(results: dict) -> str:
    """One line per measurement: what, on which data, the value(s)."""
    rows = [("metric", "data", "value", "n")]
    for f, r in results["qa"].items():
        rows += [("qa_f1", f, f"{r['f1']:.4f}", str(r["n"])),
                 ("qa_exact_match", f, f"{r['exact_match']:.4f}", str(r["n"]))]
    for d, r in results["nll"].items():
        rows += [("heldout_nll", d, f"{r['nll']:.4f}", str(r["tokens"])), ("heldout_ppl", d, f"{r['ppl']:.2f}", "")]
    for task, metrics in results["lm_eval"].items():
        rows += [(m, f"lm-eval {task}", f"{v:.4f}", "") for m, v in metrics.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smft-eval", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a checkpoint folder (<out_dir>/checkpoints or step_N) or an exported HF folder")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: the model folder's, else the "
                                       "checkpoint's model.tokenizer, else the tokenizer of its run's data)")
    p.add_argument("--qa", action="append", default=[], help="QA JSONL (repeatable)")
    p.add_argument("--nll", action="append", default=[], help="MDS folder for held-out NLL (repeatable)")
    p.add_argument("--nll-batches", type=int, help="at most this many batches per --nll folder")
    p.add_argument("--lm-eval", default="", help="comma-separated lm-eval tasks (needs the lmeval extra)")
    p.add_argument("--lm-eval-include", help="a folder of lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, help="at most this many documents per lm-eval task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length for --qa")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--json", help="write the results here (default: print only the table)")
    return p


@console_script
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tasks = [t for t in args.lm_eval.split(",") if t]
    if not (args.qa or args.nll or tasks):
        raise DataError("nothing to evaluate: pass --qa FILE, --nll MDS_FOLDER and/or --lm-eval TASKS")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--nll-batches", args.nll_batches), ("--lm-eval-limit", args.lm_eval_limit)):
        if value is not None and value < 1:
            raise DataError(f"{flag} {value} must be >= 1")
    if args.qa:
        check_inputs(args.qa, None)  # a typo fails before the model loads
    for folder in args.nll:  # a damaged MDS folder too (remote URIs are the loader's)
        if "://" not in folder:
            if not Path(folder).is_dir():
                raise DataError(f"--nll {folder} does not exist: pass an MDS folder written by `smft-data`")
            check_mds_folder("--nll", Path(folder))
    model, tok = load_eval_model(args.model, args.tokenizer, args.device)
    results = evaluate_model(model, tok, args.qa, args.nll, tasks, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, nll_batches=args.nll_batches,
                             lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(results, model=str(args.model), tokenizer=tok.name_or_path),
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
