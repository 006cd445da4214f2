"""`smft-stream`: continual learning over a stream of chunks, across runs.

    smft-stream --config configs/paper/finetune_triviaqa_sparse_1p3b.yaml --out runs/stream \
        --chunk data/tq/part1 --chunk data/tq/part2 --chunk data/tq/part3 \
        --eval-qa data/nq/qa.jsonl --eval-nll data/heldout  [key=value ...]
    torchrun --nproc_per_node 8 launchers/stream.py ...
    ENTRY=launchers/stream.py CONFIG=... OVERRIDES="--out runs/stream --chunk ... --chunk ..." sbatch slurm/finetune.sh

Each chunk is a folder written by `smft-data facts` or `smft-data docs` (`train/`: MDS samples
with a `group` column; `qa.jsonl`, when present, is what the chunk teaches), or an MDS folder
itself (with an optional `qa.jsonl` inside). For each chunk
in order, one run of the training loop (`smft_dist.train.loop.train`):

- learns it: one pass over its samples (`steps` derived from the sample count and the global
  batch, batch_size x world x grad_accum), starting from the previous chunk's final checkpoint
  (the first from the config's model.init_from);
- evaluates it before and after (in-run evaluation: the chunk's own qa.jsonl, what it learns,
  plus `--eval-qa`/`--eval-nll`, what it must not forget), into the chunk's metrics.jsonl;
- checkpoints it in `OUT/chunk_<i>/checkpoints`;
- records it in `OUT/stream.jsonl`: chunk, steps, the evaluation after it, the checkpoint.

A killed or preempted stream, run again with the same arguments, skips the chunks its log records
and resumes the current one from its last checkpoint (checkpoint.resume=auto inside the chunk), so
it ends where an uninterrupted stream ends. Preemption (SIGUSR1/SIGTERM) exits 75 as the loop does.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from smft_dist.config import ConfigError, RunConfig, load_config, mds_samples
from smft_dist.data.loader import DataError
from smft_dist.errors import console_script

log = logging.getLogger("smft_dist")

STREAM_LOG = "stream.jsonl"


def one_pass_steps(cfg: RunConfig, world_size: int) -> int:
    """Optimizer steps of one pass over data.train: whole global batches (the loader drops the rest)."""
    samples = mds_samples(Path(cfg.data.train) / "index.json")
    global_batch = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    if not samples or samples < global_batch:
        raise DataError(f"{cfg.data.train} holds {samples} samples, less than one global batch (batch_size "
                        f"{cfg.data.batch_size} x world {world_size} x grad_accum {cfg.optim.grad_accum})")
    return samples // global_batch


def read_stream_log(out: Path) -> list[dict]:
    path = out / STREAM_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chunk_config(config: list[str], overrides: list[str], chunk: Path, index: int, out: Path,
                 init_from: str | None, eval_qa: list[str], eval_nll: str | None, world_size: int) -> RunConfig:
    """The run config of chunk `index`: the user's config and overrides, then the stream's keys."""
    data = chunk / "train" if (chunk / "train" / "index.json").is_file() else chunk
    qa = ([str(chunk / "qa.jsonl")] if (chunk / "qa.jsonl").is_file() else []) + list(eval_qa)
    keys = [f"data.train={data}", f"out_dir={out / f'chunk_{index}'}", "checkpoint.resume=auto",
            f"eval.qa=[{','.join(json.dumps(q) for q in qa)}]"]
    if init_from:
        keys.append(f"model.init_from={init_from}")
    if eval_nll:
        keys.append(f"eval.nll={eval_nll}")
    cfg = load_config(config, [*overrides, *keys])
    if cfg.mode != "finetune":
        raise ConfigError(f"mode={cfg.mode}: a stream finetunes (mode=finetune, any method)")
    cfg.steps = one_pass_steps(cfg, world_size)
    if cfg.eval.every <= 0 or cfg.eval.every > cfg.steps:
        cfg.eval.every = cfg.steps  # before and after the chunk at least
    return cfg


def run_stream(config: list[str], chunks: list[str], out: str | Path, overrides: list[str] = (),
               eval_qa: list[str] = (), eval_nll: str | None = None) -> int:
    """Learn `chunks` in order (see the module docstring). -> 0, or the loop's preemption exit code."""
    from smft_dist.distributed import init_distributed
    from smft_dist.checkpoint import layout as ckpt
    from smft_dist.train.loop import train

    out = Path(out)
    chunks = [Path(c) for c in chunks]
    for c in chunks:
        if not ((c / "index.json").is_file() or (c / "train" / "index.json").is_file()):
            raise DataError(f"chunk {c} is neither an MDS folder (index.json) nor an `smft-data facts`/`docs` output "
                            f"(train/index.json): write it with `smft-data facts` or `smft-data docs`")
    first = load_config(config, list(overrides))
    ctx = init_distributed(first.dist)
    done = read_stream_log(out)
    if [d["data"] for d in done] != [str(c) for c in chunks[:len(done)]]:
        raise ConfigError(f"{out / STREAM_LOG} records chunks {[d['data'] for d in done]}, which do not begin the "
                          f"given --chunk folders: pass the same chunks in the same order, or another --out")
    init_from = done[-1]["checkpoint"] if done else first.model.init_from
    for i in range(len(done), len(chunks)):
        cfg = chunk_config(config, list(overrides), chunks[i], i, out, init_from, list(eval_qa), eval_nll,
                           ctx.world_size)
        torch.manual_seed(cfg.seed + i)  # the same chunk starts from the same RNG, resumed or not
        if ctx.is_main:
            print(f"stream: chunk {i + 1}/{len(chunks)} {chunks[i]} ({cfg.steps} steps)", flush=True)
        rc = train(cfg)
        if rc != 0:
            return rc
        checkpoint = str(Path(cfg.out_dir) / "checkpoints")
        evals = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
                 if '"eval/' in line] if ctx.is_main else []
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            record = {"chunk": i, "data": str(chunks[i]), "steps": cfg.steps,
                      "step_dir": str(ckpt.resolve_checkpoint(checkpoint)), "checkpoint": checkpoint,
                      "before": _eval_only(evals[0]) if evals else {}, "after": _eval_only(evals[-1]) if evals else {}}
            with open(out / STREAM_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        if dist.is_initialized():
            dist.barrier()
        init_from = checkpoint
    return 0


def _eval_only(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("eval/")}


@console_script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="smft-stream", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, action="append", help="the finetune run config (repeatable, merged)")
    p.add_argument("--chunk", required=True, action="append", dest="chunks",
                   help="an MDS folder from smft-data facts/docs; repeat in stream order")
    p.add_argument("--out", required=True, help="the stream's folder (chunk runs and stream.jsonl)")
    p.add_argument("--eval-qa", action="append", default=[], help="QA JSONL to watch for forgetting (repeatable)")
    p.add_argument("--eval-nll", help="an MDS folder for held-out NLL after every chunk")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="key=value overrides of every chunk's run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_stream(args.config, args.chunks, args.out, args.overrides, args.eval_qa, args.eval_nll)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
