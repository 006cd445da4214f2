"""GPU check: the paper's setup on every visible GPU, a few steps of each phase through the real
`build_run` / `Trainer.train_step`, with per-stage device time, exchange bytes and peak memory
against the plan.

    python -m smft_dist.bench.gpu_check --json benchmarks/results/gpu_check.json

The command launches itself under torchrun over every visible GPU (`python -m
torch.distributed.run --standalone --nproc_per_node <GPUs> -m smft_dist.bench.gpu_check ...`; run
that yourself to choose the count). One process per GPU, NCCL, the memory sharded over all of them
(mp = world) and looked up by the sharded exchange (`dist.memory_exchange=auto`). Phases, in order:

- pretrain: DeepSpeed ZeRO-1 bf16, `--batch` x `--seq-len` random tokens per GPU;
- df index: a forward-only pass over `--df-batches` batches (the TF-IDF background);
- full_finetune: DeepSpeed ZeRO-1 bf16 on the same shapes;
- sparse_finetune: the paper's fact batches, `--fact-rows` (8) paraphrases of one fact padded to
  `--fact-len` (64) tokens per GPU, TF-IDF top-t over the df index, SGD, the update ledger on
  (its background writer, fsync at the end, as `ledger.fsync=checkpoint` does);
- pretrain_offload: pretrain with the memory shards in host memory (model.memory_offload=host,
  docs/offload.md). Its `offload` entry: host->device bytes per timed step (the rows the lookups
  copied in, `ValueTable.moved_bytes["h2d"]`) over the step's time, as a fraction of the bandwidth
  of a pinned host->device copy measured in the same run (CUDA only; not measured otherwise).

Per phase: the median step time and tokens/s over `--steps` timed steps (after `--warmup`); then
`--profile-steps` steps under `torch.profiler`, whose device time (CUDA kernels launched inside
the range) is summed per stage label: smft/scoring, smft/exchange_fwd, smft/bag, smft/exchange_bwd,
smft/selection, smft/optimizer, smft/ledger (a label the code did not emit in that phase is
reported as "missing", never as 0), with `ShardedValueTable.bytes_sent` per step for the two
exchange labels; peak allocated and reserved CUDA memory over the timed steps against
`memory_plan(cfg, world, mp)`. `not_measured` lists what this run could not see (one GPU: no
all-to-all, no NCCL; no CUDA: no device time, no allocator peaks).

Without CUDA it writes `{"skipped": reason}` and exits 0. `--allow-cpu` runs the whole code path
on the CPU (gloo instead of NCCL, DeepSpeed's CPU accelerator) with `--cpu-ranks` processes; use
`--model configs/model/tiny.yaml`: the test of the code path.

Offline GPU machines: the import closure is torch, DeepSpeed, transformers and this package (no
omegaconf, no mosaicml-streaming, no peft: configs are built as dataclasses, the model YAML is
read with PyYAML, batches are synthetic). Carry these wheels (the pins of constraints.txt: the
dependency closure of deepspeed and transformers) and install them with `pip install --no-index
--find-links <dir> <the list>`, torch being the CUDA build of 2.13.0 already on the machine:

    deepspeed==0.19.8 einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2
    py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 numpy==2.4.6 packaging==26.4 tqdm==4.70.1
    transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0
    PyYAML==6.0.4 regex==2026.12.2 kernels==0.19.1 tomlkit==0.15.3 hf-xet==1.8.0
    httpx2==2.17.0 httpcore2==2.17.0 h11==0.16.0 anyio==4.16.0 idna==3.21 truststore==0.10.5
    typer==0.29.2 click==8.5.1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0
    shellingham==1.5.4 annotated-doc==0.0.7

(torch's own dependencies, filelock, fsspec, Jinja2, MarkupSafe, networkx, sympy, mpmath,
setuptools and typing_extensions, come with torch), and this repository on PYTHONPATH (or
`pip install --no-deps -e .`). The optimizer under ZeRO is torch's AdamW, so no DeepSpeed fused
optimizer op is built (not yet confirmed on a GPU); on the CPU DeepSpeed builds its shared-memory
communication op once (about a minute, with ninja and a C++ compiler).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smft_dist.config import (DataConfig, DistConfig, LedgerConfig, ModelConfig, OptimConfig, RunConfig,
                              SelectionConfig, validate)

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"pretrain": ("pretrain", "full"), "full_finetune": ("finetune", "full"),
          "sparse_finetune": ("finetune", "sparse_memory"), "pretrain_offload": ("pretrain", "full")}
PINNED_COPY_BYTES = 1 << 28  # one pinned host->device copy of 256 MiB: long enough to reach the link's rate
LABELS = ("smft/scoring", "smft/exchange_fwd", "smft/bag", "smft/exchange_bwd", "smft/selection", "smft/optimizer",
          "smft/ledger")
EXCHANGE_PHASE = {"smft/exchange_fwd": "fwd", "smft/exchange_bwd": "bwd"}  # ShardedValueTable.bytes_sent keys
RESULT = "gpu_check_result.json"  # what rank 0 leaves in --work-dir for the launching process


def model_config(path: Path) -> ModelConfig:
    import yaml

    return ModelConfig(**dict(yaml.safe_load(path.read_text())["model"]))


def run_config(args, phase: str, world: int, df_path: str | None) -> RunConfig:
    """The phase's run: bf16, DeepSpeed ZeRO-1 for the dense phases (sparse memory finetuning
    trains no dense weight and runs the plain engine), mp = world."""
    mode, method = PHASES[phase]
    sparse = method == "sparse_memory"
    cfg = RunConfig(
        mode=mode, method=method, precision="bf16", steps=args.warmup + args.steps + args.profile_steps, seed=0,
        out_dir=str(Path(args.work_dir) / phase),
        model=dataclasses.replace(model_config(Path(args.model)),
                                  memory_offload="host" if phase == "pretrain_offload" else "none"),
        data=DataConfig(seq_len=args.fact_len if sparse else args.seq_len,
                        batch_size=args.fact_rows if sparse else args.batch),
        optim=OptimConfig(lr=1e-5, memory_lr=2.0 if sparse else 1e-3, warmup_steps=0),
        selection=SelectionConfig(top_t=args.top_t, mode="tfidf", df_path=df_path),
        dist=DistConfig(device=args.device, engine="deepspeed", zero_stage=1),
        ledger=LedgerConfig(enabled=sparse),
    )
    validate(cfg, world)
    return cfg


def token_batch(g: torch.Generator, rows: int, seq_len: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def fact_batch(g: torch.Generator, rows: int, seq_len: int, vocab: int) -> dict:
    """`rows` paraphrases of one fact, padded to `seq_len` (the paper pads them: a packed batch of
    paraphrases would let the model copy): a random statement of seq_len/4..3/4 tokens, each row
    with a quarter of its tokens redrawn; padding has mask 0 and label -100."""
    n = int(torch.randint(seq_len // 4, 3 * seq_len // 4 + 1, (1,), generator=g))
    fact = torch.randint(3, vocab, (n,), generator=g)
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        row = fact.clone()
        redraw = torch.randperm(n, generator=g)[: n // 4]
        row[redraw] = torch.randint(3, vocab, (redraw.numel(),), generator=g)
        ids[r, :n] = row
    mask = torch.zeros_like(ids)
    mask[:, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def phase_batches(args, phase: str, seed: int, vocab: int, n: int) -> list[dict]:
    """`n` batches of the phase's shape: fact batches for sparse finetuning, else random tokens."""
    g = torch.Generator().manual_seed(seed)
    if phase == "sparse_finetune":
        return [fact_batch(g, args.fact_rows, args.fact_len, vocab) for _ in range(n)]
    return [token_batch(g, args.batch, args.seq_len, vocab) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exchange_bytes(trainer) -> dict:
    """Bytes this rank has put on the wire so far, per exchange phase, over its sharded tables."""
    out = {"fwd": 0, "bwd": 0, "sync": 0}
    for t in trainer.tables:
        for k, v in getattr(t, "bytes_sent", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def stage_profile(trainer, batches: list[dict], device: torch.device) -> dict:
    """Run `batches` under the profiler -> per stage label, per step: the device time of the
    kernels launched inside the label's ranges (CPU run: the ranges' CPU time), the calls, and for
    the exchange labels the bytes this rank sent."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    before = exchange_bytes(trainer)
    with profile(activities=activities) as prof:
        for b in batches:
            trainer.train_step(b)
        sync(device)
    after = exchange_bytes(trainer)
    n = len(batches)
    # The CPU-side ranges only: on CUDA each range also appears on the device timeline under the
    # same name, and its device_time_total already sums the kernels launched inside it.
    ranges = [e for e in prof.events() if e.name in LABELS and e.device_type.name == "CPU"]
    stages = {}
    for label in LABELS:
        mine = [e for e in ranges if e.name == label]
        if not mine:
            stages[label] = "missing"
            continue
        stage = {"calls_per_step": len(mine) / n, "cpu_ms_per_step": sum(e.cpu_time_total for e in mine) / 1e3 / n,
                 "device_ms_per_step": sum(e.device_time_total for e in mine) / 1e3 / n if cuda else None}
        if label in EXCHANGE_PHASE:
            sent = (after[EXCHANGE_PHASE[label]] - before[EXCHANGE_PHASE[label]]) / n
            stage["bytes_sent_per_step"] = sent
            seconds = (stage["device_ms_per_step"] if cuda else stage["cpu_ms_per_step"]) / 1e3
            stage["bytes_per_s"] = sent / seconds if seconds > 0 else None
        stages[label] = stage
    return stages


def memory_against_plan(cfg: RunConfig, ctx) -> dict:
    from smft_dist.model.memory_plan import memory_plan

    plan = memory_plan(cfg, ctx.world_size, ctx.mp_size)
    out = {"plan_total_bytes": plan["total_bytes"], "plan_parts": plan["parts"]}
    if ctx.device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(ctx.device), torch.cuda.max_memory_reserved(ctx.device)
        out.update(peak_allocated_bytes=allocated, peak_reserved_bytes=reserved,
                   allocated_over_plan=allocated / plan["total_bytes"],
                   reserved_over_plan=reserved / plan["total_bytes"])
    return out


def open_ledger(cfg: RunConfig, ctx, trainer):
    """The run's update ledger, as the training loop opens it (without omegaconf: the model
    config goes into ledger.json as a plain dict)."""
    from smft_dist.checkpoint.layout import layer_names
    from smft_dist.patch.ledger import Ledger

    m = cfg.model
    meta = {"model": dataclasses.asdict(m), "layers": layer_names(trainer.model), "num_rows": m.memory_n_keys ** 2,
            "dim": m.memory_value_dim, "dtype": m.memory_value_dtype, "run": "gpu_check",
            "world_size": ctx.world_size, "mp": ctx.mp_size}
    return Ledger.open(Path(cfg.out_dir) / "ledger", rank=ctx.rank, world_size=ctx.world_size,
                       names=layer_names(trainer.model), meta=meta, writes_rows=ctx.replicate_rank == 0, step=0,
                       fsync=cfg.ledger.fsync)


def run_phase(args, phase: str, df_path: str | None) -> tuple[dict, object]:
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = run_config(args, phase, world, df_path)
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    if cfg.ledger.enabled:
        trainer.ledger = open_ledger(cfg, ctx, trainer)
    seed = 1000 * ctx.rank + list(PHASES).index(phase)  # ranks see different tokens
    batches = phase_batches(args, phase, seed, cfg.model.vocab_size, args.warmup + args.steps + args.profile_steps)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times, tokens, h2d = [], 0, []
    for i, b in enumerate(batches[: args.warmup + args.steps]):
        sync(ctx.device)
        h2d_before = sum(t.moved_bytes["h2d"] for t in trainer.tables)
        t0 = time.perf_counter()
        metrics = trainer.train_step(b)
        sync(ctx.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens = metrics["tokens"]
            h2d.append(sum(t.moved_bytes["h2d"] for t in trainer.tables) - h2d_before)
        if ctx.is_main:
            print(f"{phase} step {i + 1}: {time.perf_counter() - t0:.3f} s, loss {metrics['loss']:.3f}", flush=True)
    memory = memory_against_plan(cfg, ctx)  # the timed steps' peaks, before the profiler's own buffers
    stages = stage_profile(trainer, batches[args.warmup + args.steps:], ctx.device)
    step_s = statistics.median(times)
    engine = type(trainer.engine).__name__
    out = {"engine": engine, "zero_stage": cfg.dist.zero_stage if engine == "DeepSpeedEngine" else None,
           "micro_batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "step_s": step_s, "step_s_all": times,
           "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "loss_last": metrics["loss"],
           "stages": stages, "memory": memory,
           "exchanges": sorted({t.last_exchange for t in trainer.tables if getattr(t, "last_exchange", None)})}
    for key in ("rows_updated", "rows_selected"):
        if key in metrics:
            out[f"{key}_last"] = metrics[key]
    if cfg.model.memory_offload == "host":
        per_s = sum(h2d) / sum(times)
        pinned = pinned_copy_bytes_per_s(ctx.device)
        out["offload"] = {"h2d_bytes_per_step": statistics.median(h2d), "h2d_bytes_per_s": per_s,
                          "host_rows_moved_last": metrics["host_rows_moved"], "pinned_copy_bytes_per_s": pinned,
                          "fraction_of_pinned_copy": per_s / pinned if pinned else None}
    if trainer.ledger is not None:
        import torch.distributed as dist

        from smft_dist.patch.ledger import complete_steps

        trainer.ledger.close()  # drains the writer and fsyncs: every step durable, as at a run's end
        if dist.is_initialized():
            dist.barrier()  # every rank's files closed before they are read
        out["ledger_steps_complete"] = len(complete_steps(trainer.ledger.root))  # held by every rank's files
    return out, trainer


def pinned_copy_bytes_per_s(device: torch.device) -> float | None:
    """Bandwidth of a pinned host->device copy of PINNED_COPY_BYTES (the best of 5, after one warm-up
    copy), timed by CUDA events. None without CUDA: host and device are one memory."""
    if device.type != "cuda":
        return None
    host = torch.empty(PINNED_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    best = float("inf")
    for i in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        if i:
            best = min(best, start.elapsed_time(end) / 1e3)
    return PINNED_COPY_BYTES / best


def build_df(trainer, args, out_dir: Path, rank: int) -> str:
    """A df index over a few batches (a forward-only pass, collective), saved where selection.df_path reads it."""
    from smft_dist.checkpoint.layout import layer_names
    from smft_dist.selection import build_background_index

    batches = phase_batches(args, "pretrain", 1000 * rank + len(PHASES), trainer.model.config.vocab_size,
                            args.df_batches)
    with trainer.autocast():
        indexes = build_background_index(trainer.model, batches, len(batches), trainer.tables, corpus="synthetic")
    for name, index in zip(layer_names(trainer.model), indexes):
        index.save(out_dir / f"{name}.safetensors")  # collective; global rank 0 writes
    return str(out_dir)


def free_memory(device: torch.device) -> None:
    """Return a dropped trainer's memory (after the last reference is gone): the next phase's model
    must not share the GPU with this one's."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def not_measured(world: int, device: str) -> list[str]:
    out = []
    if world == 1:
        out.append("the all-to-all exchange and NCCL: one rank holds the whole memory table (no sharding), so "
                   "nothing is exchanged (the exchange labels are missing, no bytes move); run on 2+ GPUs")
    if device != "cuda":
        out.append("device time and CUDA memory: a CPU run reports the ranges' CPU time and no allocator peaks")
        out.append("the pinned host->device copy (pretrain_offload): without CUDA host and device are one memory")
    return out


def worker(args) -> dict:
    """One rank under torchrun: every phase in order; rank 0 writes the result to --work-dir."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "world": world, "mp": world, "model": Path(args.model).name,
           "precision": "bf16", "not_measured": not_measured(world, args.device), "phases": {}}
    phases = out["phases"]
    phases["pretrain"], trainer = run_phase(args, "pretrain", None)
    out["backend"] = dist.get_backend() if dist.is_initialized() else None
    df_path = build_df(trainer, args, Path(args.work_dir) / "df", trainer.ctx.rank)
    del trainer
    free_memory(device)
    phases["full_finetune"], trainer = run_phase(args, "full_finetune", None)
    del trainer
    free_memory(device)
    phases["sparse_finetune"], trainer = run_phase(args, "sparse_finetune", df_path)
    del trainer
    free_memory(device)
    phases["pretrain_offload"], trainer = run_phase(args, "pretrain_offload", None)
    del trainer
    free_memory(device)
    out["sparse_over_full_step_time"] = phases["sparse_finetune"]["step_s"] / phases["full_finetune"]["step_s"]
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(args.work_dir) / RESULT).write_text(json.dumps(out, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/smft_1p3b.yaml"), help="YAML with a model: section")
    p.add_argument("--seq-len", type=int, default=2048, help="pretraining and full finetuning tokens per row")
    p.add_argument("--batch", type=int, default=8, help="pretraining and full finetuning rows per GPU")
    p.add_argument("--fact-rows", type=int, default=8, help="paraphrases per fact batch (sparse finetuning)")
    p.add_argument("--fact-len", type=int, default=64, help="fact batches' padded length")
    p.add_argument("--steps", type=int, default=4, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=2, help="steps per phase under the profiler")
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--df-batches", type=int, default=4, help="batches of the df index")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (tests)")
    p.add_argument("--cpu-ranks", type=int, default=1, help="processes with --allow-cpu (with CUDA: one per GPU)")
    p.add_argument("--json", default=None, help="where to write the result")
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)  # set by the launching process
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def launch(args, argv: list[str]) -> dict:
    """torchrun this module over `nproc` processes; -> rank 0's result."""
    nproc = torch.cuda.device_count() if args.device == "cuda" else args.cpu_ranks
    with tempfile.TemporaryDirectory(prefix="smft_gpu_check_") as work:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "smft_dist.bench.gpu_check", *argv, "--work-dir", work]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run(cmd, env=env)
        result = Path(work) / RESULT
        if r.returncode != 0 or not result.exists():
            raise SystemExit(f"error: the GPU check's ranks failed (torchrun exit {r.returncode}); "
                             "see their output above")
        return json.loads(result.read_text())


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.work_dir is not None:  # a rank under torchrun
        return worker(args)
    if args.device == "cpu" and not args.allow_cpu:
        out = {"skipped": "no CUDA device (torch.cuda.is_available() is False): the GPU check needs a GPU; "
                          "--allow-cpu runs the code path on the CPU"}
    else:
        out = launch(args, argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
