"""What the memory layer costs a user: pretraining tokens/s of the demo's memory model over its
dense twin's (docs/performance.md).

    python -m smft_dist.bench.memory_overhead --json benchmarks/results/memory_overhead.json

Both models are built by the trainer (`build_run`) from the demo's own config (configs/demo/cpu.yaml:
its model, batch size, sequence length and pretraining overrides); the dense twin is the same config
with `model.memory_layers=[]` (smft_dist.continual.benchmark.model_overrides), i.e. the memory
layer's FFN back as a dense MLP. Their `Trainer.train_step`s on the same random token batches
alternate in one process, so both see the same machine load: the reported ratio is the median of
the per-pair ratios. Profiled steps of both (`torch.profiler`, CPU, again alternating) then give
each model's self time by op and by site: the autograd node in the backward, else the innermost
smft_dist frame (file and function). The gap (memory - twin) is reported per op and per site.

Shape legend: B batch rows, S sequence length (tokens per step = B x S, all real tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

DEMO_CONFIG = "configs/demo/cpu.yaml"


def build_pair(config: str, precision: str):
    """-> (memory Trainer, dense-twin Trainer, (B, S), vocab) built like the demo's pretraining stages."""
    from smft_dist.config import DistConfig
    from smft_dist.continual.benchmark import derive, load_continual_config, model_overrides
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_run

    c = load_continual_config(config)
    common = list(c.pretrain.overrides) + ["mode=pretrain", f"steps={c.pretrain.steps}", f"precision={precision}"]
    ctx = init_distributed(DistConfig())
    memory = build_run(derive(c.run, common, "memory model"), ctx)
    twin = build_run(derive(c.run, common + model_overrides(c, "dense"), "dense twin"), ctx)
    return memory, twin, (c.run.data.batch_size, c.benchmark.seq_len), c.run.model.vocab_size


def random_batch(g: torch.Generator, shape: tuple[int, int], vocab: int) -> dict:
    """B x S real tokens (no padding), labels = inputs (the model shifts them), as a pretraining batch."""
    ids = torch.randint(1, vocab, shape, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def timed_step(trainer, batch: dict) -> float:
    t0 = time.perf_counter()
    trainer.train_step(batch)
    return time.perf_counter() - t0


_PY_FRAME = re.compile(r"^(.*\.py)\((\d+)\): (.*)$")  # a Python function event of with_stack


def site_of(event) -> str:
    """Where an op ran: its nearest autograd node ("backward: MmBackward0") or, in a forward or an
    optimizer, its innermost project frame ("memory/product_keys.py forward")."""
    p = event.cpu_parent
    while p is not None:
        if p.name.startswith("autograd::engine::evaluate_function"):
            return "backward: " + p.name.split(": ", 1)[-1]
        m = _PY_FRAME.match(p.name)
        if m and "smft_dist/" in m.group(1):
            return f"{m.group(1).split('smft_dist/', 1)[1]} {m.group(3)}"
        p = p.cpu_parent
    return "(outside the project)"


def profile_steps(trainers: list, batches: list[dict]) -> list[dict]:
    """Per trainer: self CPU time per op, per site (`site_of`) and per (site, op) over `batches`
    steps, ms per step; the project's record_function stages (smft/...) as their inclusive time.
    The trainers' steps alternate, each under its own profiler, so they see the same machine load."""
    from torch.profiler import ProfilerActivity, profile

    sums = [{k: defaultdict(float) for k in ("op", "site", "site_op", "stage")} for _ in trainers]
    for b in batches:
        for tr, acc in zip(trainers, sums):
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                tr.train_step(b)
            for e in prof.events():
                if e.name.startswith("smft/"):
                    acc["stage"][e.name] += e.cpu_time_total / 1e3 / len(batches)
                elif not _PY_FRAME.match(e.name):  # Python frames' own time is interpreter overhead: left out
                    ms, site = e.self_cpu_time_total / 1e3 / len(batches), site_of(e)
                    acc["op"][e.name] += ms
                    acc["site"][site] += ms
                    acc["site_op"][f"{site} | {e.name}"] += ms
    top = lambda d, k: dict(sorted(((a, round(v, 3)) for a, v in d.items()), key=lambda kv: -kv[1])[:k])  # noqa: E731
    return [{"self_ms_per_step_by_op": top(acc["op"], 40), "self_ms_per_step_by_site": top(acc["site"], 30),
             "self_ms_per_step_by_site_op": top(acc["site_op"], 40), "stage_ms_per_step": top(acc["stage"], 10),
             "total_self_ms_per_step": round(sum(acc["op"].values()), 3)} for acc in sums]


def op_gap(memory_ops: dict, twin_ops: dict, k: int = 25) -> dict:
    """memory - twin self time per op (ms per step), the largest first: where the gap goes."""
    ops = set(memory_ops) | set(twin_ops)
    gap = {o: memory_ops.get(o, 0.0) - twin_ops.get(o, 0.0) for o in ops}
    return dict(sorted(((o, round(v, 3)) for o, v in gap.items()), key=lambda kv: -abs(kv[1]))[:k])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the demo runs fp32")
    p.add_argument("--steps", type=int, default=30, help="timed steps per model (alternating)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", dest="profile_steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="the demo's workers run 1 thread each")
    p.add_argument("--json", default="benchmarks/results/memory_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    memory, twin, shape, vocab = build_pair(args.config, args.precision)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(g, shape, vocab) for _ in range(8)]
    tokens = shape[0] * shape[1]
    mem_s, twin_s = [], []
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        if i % 2:  # alternate which goes first: neither always follows the other's cache state
            m, t = timed_step(memory, b), timed_step(twin, b)
        else:
            t, m = timed_step(twin, b), timed_step(memory, b)
        if i >= args.warmup:
            mem_s.append(m)
            twin_s.append(t)
    ratios = [t / m for m, t in zip(mem_s, twin_s)]  # tokens/s of memory over twin's = twin time / memory time
    mem_prof, twin_prof = profile_steps([memory, twin], batches[:args.profile_steps])
    result = {
        "config": args.config, "precision": args.precision, "threads": args.threads,
        # the machine's 1-minute load average (runnable processes) around the run: on a shared
        # machine it says how far the two models competed with others for the cores
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "tokens_per_step": tokens, "steps": args.steps,
        "memory_tokens_per_s": round(tokens / statistics.median(mem_s), 1),
        "twin_tokens_per_s": round(tokens / statistics.median(twin_s), 1),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
        "memory_step_ms": round(1e3 * statistics.median(mem_s), 3),
        "twin_step_ms": round(1e3 * statistics.median(twin_s), 3),
        "gap_by_op_ms": op_gap(mem_prof["self_ms_per_step_by_op"], twin_prof["self_ms_per_step_by_op"]),
        "gap_by_site_ms": op_gap(mem_prof["self_ms_per_step_by_site"], twin_prof["self_ms_per_step_by_site"]),
        "memory_profile": mem_prof, "twin_profile": twin_prof,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("memory_tokens_per_s", "twin_tokens_per_s", "ratio", "ratio_quartiles",
                                             "memory_step_ms", "twin_step_ms")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
