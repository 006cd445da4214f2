"""Benchmark: a resident memory shard against a host-offloaded one (model.memory_offload, docs/offload.md).

    python -m smft_dist.bench.offload --modes finetune,pretrain --slots 16777216 --json benchmarks/results/offload.json

Spawns `world` ranks (gloo on CPU; nccl when every rank has a GPU). For each mode in turn, each
rank builds two copies of the same memory layer (same seed, same rows), one resident and one
offloaded to host memory, and steps them alternately on the same batches (which goes first
alternates too), so both see the same machine load and the ratio of their step times is paired
(see `finetune_step`):

- `finetune`: the sparse finetune step of `smft_dist.bench.finetune_step` (dense weights
  frozen, TF-IDF top-t selection, `MaskedSGD`), both layers on one dense model;
- `pretrain`: the pretraining step on a new batch each step (a fixed one would narrow the rows
  the lookups read as the queries fit it): each layer on its own copy of the dense model (same
  seed), dense weights trained by AdamW on the mean of the ranks' gradients, memory rows by
  `--memory-optimizer` (default rowwise_adagrad: one fp32 per row, which a 16M-slot shard affords).

Reports the median step of each (max over ranks), the paired ratio offloaded / resident, the rows
and bytes the offloaded shard moved per step and direction (`table.moved_rows` / `moved_bytes`),
and whether the two gave bitwise the same losses, rows (and, pretraining, dense weights).

On CPU the host is the device: the offloaded path runs its own gather of the unique rows it
reads and its handover of the row gradients, but no copy crosses PCIe. The ratio measures that
bookkeeping; `smft_dist.bench.gpu_check` measures the transfers on a GPU.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from smft_dist.bench.finetune_step import (_add_variant, _dense_model, _reset_peak_rss, _rss_mb, _step, _summarise,
                                           add_step_args, install_memory)
from smft_dist.bench import write_results
from smft_dist.distributed.spawn import run_ranks
from smft_dist.memory.values import OFFLOADS  # model.memory_offload's values: "none" (the baseline), "host"

MOVED = ("rows_h2d", "rows_d2h", "bytes_h2d", "bytes_d2h")


@dataclass
class _PretrainVariant:
    """A dense model with its memory layer, trained whole: dense AdamW plus the memory row optimizer."""

    model: torch.nn.Module
    tables: list
    opt: object  # the memory row optimizer
    dense_opt: torch.optim.Optimizer
    rows: list = field(default_factory=list)


def _pretrain_variant(ctx, args, offload: str) -> _PretrainVariant:
    from smft_dist.config import OptimConfig
    from smft_dist.optim import build_memory_row_optimizer

    cfg = OptimConfig(memory_row_optimizer=args.memory_optimizer)
    model = _dense_model(args, ctx)  # seeded: every variant starts from the same dense weights
    _, tables = install_memory(model, ctx, args, args.slots, 0, offload, trains_densely=True)
    dense_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, foreach=False)  # foreach: temporaries of every weight's size
    return _PretrainVariant(model, tables, build_memory_row_optimizer(tables, cfg), dense_opt)


def _pretrain_step(v: _PretrainVariant, x, record: bool) -> None:
    """One data-parallel pretraining step on x (B x S token ids), timed by stage when `record`."""
    world = dist.get_world_size()
    dist.barrier()
    t0 = time.perf_counter()
    for t in v.tables:
        t.zero_step()
        t.set_grad_scale(1.0 / world)  # the rows' sum over ranks -> the mean, as Trainer.train_step scales them
    loss = v.model(input_ids=x, labels=x).loss
    dist.barrier()  # the slower rank's forward is not billed to the backward's first collective
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    for p in v.model.parameters():  # the mean over ranks, as DDP / DeepSpeed reduce dense gradients
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    t3 = time.perf_counter()
    updated = v.opt.step()
    v.dense_opt.step()
    v.dense_opt.zero_grad(set_to_none=False)
    t4 = time.perf_counter()
    if record:
        v.rows.append({"step": t4 - t0, "forward": t1 - t0, "backward": t2 - t1, "reduce": t3 - t2,
                       "update": t4 - t3, "updated": updated, "loss": loss.item()})


def _moved(tables) -> dict[str, int]:
    """This rank's cumulative host <-> device traffic of the tables, per direction."""
    return {"rows_h2d": sum(t.moved_rows["h2d"] for t in tables), "rows_d2h": sum(t.moved_rows["d2h"] for t in tables),
            "bytes_h2d": sum(t.moved_bytes["h2d"] for t in tables),
            "bytes_d2h": sum(t.moved_bytes["d2h"] for t in tables)}


def _rank_body(rank: int, world: int, args) -> dict:
    """-> {mode: this rank's measurements}: the modes one after the other in the same processes."""
    from smft_dist.config import DistConfig
    from smft_dist.distributed import init_distributed

    ctx = init_distributed(DistConfig(timeout_s=1200))  # reuses run_ranks' group
    g = torch.Generator().manual_seed(1000 + rank)
    batch = lambda: torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(ctx.device)  # noqa: E731
    background = [batch() for _ in range(args.background)]
    x = batch()  # finetuning's fixed batch (the facts it learns)
    stream = [batch() for _ in range(args.warmup + args.steps)]  # pretraining's: a new batch each step
    out = {}
    for mode in args.modes:
        gc.collect()  # the previous mode's variants (the key-timing hooks make cycles)
        peak_reset = _reset_peak_rss()
        out[mode] = _compare(mode, ctx, args, background, x, stream)
        out[mode]["peak_rss_mb"] = _rss_mb()["VmHWM"] if peak_reset else None
    return out


def _compare(mode: str, ctx, args, background: list, x, stream: list) -> dict:
    """Step the resident and the offloaded variant alternately; -> timings, traffic, exactness."""
    if mode == "finetune":
        model = _dense_model(args, ctx)
        variants = {o: _add_variant(model, ctx, args, args.slots, 0, background, o) for o in OFFLOADS}
        sel_cfg = argparse.Namespace(top_t=args.top_t, mode="tfidf")
        run_step = lambda v, step: _step(model, v, x, sel_cfg, args, step >= args.warmup)  # noqa: E731
        trained_dense = {o: [] for o in OFFLOADS}  # frozen, and shared by both
    else:
        variants = {o: _pretrain_variant(ctx, args, o) for o in OFFLOADS}
        run_step = lambda v, step: _pretrain_step(v, stream[step], step >= args.warmup)  # noqa: E731
        trained_dense = {o: list(v.model.parameters()) for o, v in variants.items()}
    moved = {o: [] for o in OFFLOADS}
    for step in range(args.warmup + args.steps):
        record = step >= args.warmup
        for o in (OFFLOADS if step % 2 == 0 else OFFLOADS[::-1]):  # neither always runs first
            before = _moved(variants[o].tables)
            run_step(variants[o], step)
            after = _moved(variants[o].tables)
            if record:
                moved[o].append({k: after[k] - before[k] for k in MOVED})
    res, off = variants["none"], variants["host"]
    return {"times": {o: v.rows for o, v in variants.items()}, "moved": moved,
            "losses_equal": [r["loss"] for r in res.rows] == [r["loss"] for r in off.rows],
            "rows_equal": all(torch.equal(a.weight, b.weight) for a, b in zip(res.tables, off.tables)),
            "dense_equal": all(torch.equal(a, b) for a, b in zip(trained_dense["none"], trained_dense["host"])),
            "shard_rows": res.tables[0].row_end - res.tables[0].row_start}


def run(args) -> list[dict]:
    """-> one summary per mode of args.modes, from one spawn of args.world ranks."""
    backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    ranks = run_ranks(_rank_body, args.world, args, timeout=3600, backend=backend, pg_timeout_s=1200,
                      threads=args.threads)
    return [_summary(mode, args, [r[mode] for r in ranks]) for mode in args.modes]


def _summary(mode: str, args, ranks: list[dict]) -> dict:
    """One mode's result from its per-rank measurements."""
    summary = {o: _summarise([r["times"][o] for r in ranks]) for o in OFFLOADS}
    (res_med, res_worst), (off_med, off_worst) = summary["none"], summary["host"]
    return {
        "mode": mode, "slots": args.slots, "value_dim": args.value_dim,
        "median_step_s": {o: summary[o][0]["step"] for o in OFFLOADS},
        "median_s": {o: {k: v for k, v in summary[o][0].items() if k not in ("loss", "updated")} for o in OFFLOADS},
        # paired: the two variants' steps alternate under the same load (slowest rank of each step)
        "step_ratio_offloaded_vs_resident": statistics.median(a / b for a, b in zip(off_worst["step"], res_worst["step"])),
        "ratio_of_medians": off_med["step"] / res_med["step"],
        # per rank, over the timed steps: what the offloaded shard moved, and the rows its optimizer updated
        "timed_steps": args.steps,
        "moved_per_rank": [{k: sum(m[k] for m in r["moved"]["host"]) for k in MOVED} for r in ranks],
        "moved_per_step_per_rank": [{k: sum(m[k] for m in r["moved"]["host"]) / args.steps for k in MOVED}
                                    for r in ranks],
        "rows_updated_per_rank": [sum(t["updated"] for t in r["times"]["host"]) for r in ranks],
        "resident_moved_rows": sum(m["rows_h2d"] + m["rows_d2h"] for r in ranks for m in r["moved"]["none"]),
        "losses": {o: [t["loss"] for t in ranks[0]["times"][o]] for o in OFFLOADS},  # rank 0's, per timed step
        "bitwise_equal": all(r["losses_equal"] and r["rows_equal"] and r["dense_equal"] for r in ranks),
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],  # this mode's setup and steps
        "shard_rows_per_rank": [r["shard_rows"] for r in ranks],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="finetune,pretrain", help="comma-separated: finetune, pretrain")
    p.add_argument("--slots", type=int, default=16777216, help="memory slots (a square number)")
    p.add_argument("--memory-optimizer", dest="memory_optimizer", default="rowwise_adagrad",
                   choices=("adamw", "rowwise_adagrad", "adam_rowwise"), help="pretrain: optim.memory_row_optimizer")
    p.add_argument("--json", default=None, help="write the results here")
    add_step_args(p, value_dim=32)
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    if set(args.modes) - {"finetune", "pretrain"}:
        p.error(f"--modes {','.join(args.modes)}: give finetune, pretrain or both, comma-separated")
    if math.isqrt(args.slots) ** 2 != args.slots:
        p.error(f"--slots {args.slots} is not a square number (slots = n_keys^2): e.g. 16777216 = 4096^2")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    for r in results:
        print(f"{r['mode']} at {args.slots:,} slots: resident {r['median_step_s']['none']:.3f} s, "
              f"offloaded {r['median_step_s']['host']:.3f} s, paired ratio x{r['step_ratio_offloaded_vs_resident']:.3f} "
              f"(of the medians x{r['ratio_of_medians']:.3f}); bitwise equal: {r['bitwise_equal']}\n"
              f"    moved per step, per rank: {r['moved_per_step_per_rank']}", flush=True)
    write_results(args.json, "offload", args, results)


if __name__ == "__main__":
    main()
