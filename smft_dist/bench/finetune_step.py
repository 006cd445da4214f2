"""Benchmark: one sparse-memory finetune step vs the number of memory slots (docs/design.md §2.7).

    python -m smft_dist.bench.finetune_step --world 2 --slots 1048576,4194304,16777216 --json OUT

For each slot count, spawns `world` ranks (gloo on CPU; nccl when every rank has a GPU) holding a
row-sharded table; a dense `SmftForCausalLM` (all dense weights frozen) runs a fixed batch per
rank: forward (with the sparse all-to-all lookup), TF-IDF top-t selection, backward (only the
selected rows' gradients travel), `MaskedSGD` step. Reports per slot count: the median step time
(max over ranks), the share of counting + selection + masked update, the share of product-key
scoring (which grows with sqrt(N) = n_keys, by design), and per rank the peak RSS during the steps
(setup, which also holds the dense model's build and the df pass, is reported apart; no rank ever
holds the whole table: `install_memory`).

The ratio to the smallest size is *paired*: the same processes also hold a memory layer of the
reference size on the same dense model and alternate steps between the two, so both see the same
machine load (on a shared machine, run-to-run drift is larger than the effect being measured).
The peak RSS therefore includes the reference layer's shard (ref_slots x value_dim x 4 B / world).

The dense part is sized so that it, not the product-key scoring, dominates the step, as in any
realistic model (the paper's 1.3B model spends well under 1% of its FLOPs on key scoring): d 1024,
8 layers (FFN 4d), memory in layer 4 (4 heads, k 32, k_dim 128, value_dim 32 to fit 16M slots in
RAM), 256 tokens per rank. Shrink it (--hidden/--layers) and the sqrt(N) key scoring shows more.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from smft_dist.bench import write_results
from smft_dist.distributed.spawn import run_ranks


def _rss_mb() -> dict[str, float]:
    """Current and peak resident memory of this process (Linux /proc), MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class _Variant:
    """One memory layer size installed in turn on the shared dense model."""

    slots: int
    layer: torch.nn.Module
    tables: list
    indexes: list
    opt: object
    keys_t: list = field(default_factory=list)
    rows: list = field(default_factory=list)


def _dense_model(args, ctx):
    from smft_dist.model import SmftConfig, SmftForCausalLM

    torch.manual_seed(0)
    cfg = SmftConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                     memory_layers=[args.layers // 2], memory_n_keys=args.knn, memory_heads=4, memory_knn=args.knn,
                     memory_k_dim=args.k_dim, memory_value_dim=args.value_dim, pad_token_id=0)
    return SmftForCausalLM(cfg).to(ctx.device)  # a placeholder memory layer: variants replace it


def install_memory(model, ctx, args, slots: int, seed: int, offload: str = "none",
                   trains_densely: bool = False) -> tuple:
    """Install a memory layer of `slots` slots on `model` -> (layer, this rank's tables).

    Built on the meta device, as the trainer's `build_fresh_model` does: each rank allocates only
    its shard (rows drawn from generator `seed`), never the whole N x D table (8.6 GB at 64M slots
    x value_dim 32), then the layer's dense weights (query, keys, W1/W2) are initialised from
    `seed`. offload="host": the shard moves to host memory (model.memory_offload, docs/offload.md),
    with a dense host sum of the row gradients where the memory `trains_densely` (pretraining)."""
    from smft_dist.distributed import shard_memory
    from smft_dist.memory import ProductKeyMemory

    n_keys = math.isqrt(slots)
    if n_keys * n_keys != slots:
        raise SystemExit(f"--slots {slots} is not a square number (slots = n_keys^2)")
    with torch.device("meta"):
        layer = ProductKeyMemory(args.hidden, n_keys, 4, args.knn, args.k_dim, args.value_dim)
    model.model.layers[args.layers // 2].mlp = layer
    tables = shard_memory(model, ctx, seed=seed)  # outside the layer's registered modules: to_empty skips it
    layer.to_empty(device=ctx.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.apply(model._init_weights)
    if offload == "host":  # before any optimizer is built: its row state follows the shard
        for t in tables:
            t.offload_to_host(dense_grad_sum=trains_densely)  # as the trainer does for its mode
    return layer, tables


def _add_variant(model, ctx, args, slots: int, seed: int, background: list, offload: str = "none") -> _Variant:
    """A sparse-finetuning variant: dense weights frozen, TF-IDF df index, MaskedSGD."""
    from smft_dist.optim import MaskedSGD, freeze_dense
    from smft_dist.selection import build_background_index

    layer, tables = install_memory(model, ctx, args, slots, seed, offload)
    freeze_dense(model)
    indexes = build_background_index(model, background, len(background), tables)
    v = _Variant(slots, layer, tables, indexes, MaskedSGD(tables, lr=1.0))
    layer.keys.register_forward_pre_hook(lambda *_: v.keys_t.append(time.perf_counter()))
    layer.keys.register_forward_hook(lambda *_: v.keys_t.append(time.perf_counter()))
    return v


def _step(model, v: _Variant, x, sel_cfg, args, record: bool) -> None:
    from smft_dist.selection import select_for_model

    model.model.layers[args.layers // 2].mlp = v.layer
    dist.barrier()
    v.keys_t.clear()
    t0 = time.perf_counter()
    for t in v.tables:
        t.zero_step()
    loss = model(input_ids=x, labels=x).loss
    # Wait for the slower rank's forward here, so that its lag is not billed to the selection's
    # first collective (the step's total is the same either way).
    dist.barrier()
    t1 = time.perf_counter()
    sel, stats = select_for_model(v.tables, v.indexes, sel_cfg)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    updated = v.opt.step(sel)
    t4 = time.perf_counter()
    if record:
        v.rows.append({"step": t4 - t0, "forward": t1 - t0, "select": t2 - t1, "backward": t3 - t2,
                       "update": t4 - t3, "keys": v.keys_t[1] - v.keys_t[0],
                       "candidates": int(stats[0].candidates), "selected": stats[0].selected,
                       "updated": updated, "loss": loss.item()})


def _rank_body(rank: int, world: int, args, slots: int) -> dict:
    """Build the reference (args.ref_slots) and target memory layers on one dense model, then
    alternate their steps: both see the same machine load, so their time ratio is paired."""
    from smft_dist.config import DistConfig
    from smft_dist.distributed import init_distributed

    ctx = init_distributed(DistConfig(timeout_s=1200))  # reuses run_ranks' group
    model = _dense_model(args, ctx)
    g = torch.Generator().manual_seed(1000 + rank)
    batch = lambda: torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(ctx.device)  # noqa: E731
    background = [batch() for _ in range(args.background)]
    x = batch()  # the fixed batch
    variants = [_add_variant(model, ctx, args, n, seed, background)
                for seed, n in enumerate(sorted({args.ref_slots, slots}))]
    setup_peak = _rss_mb()["VmHWM"]
    peak_reset = _reset_peak_rss()
    sel_cfg = argparse.Namespace(top_t=args.top_t, mode="tfidf")
    for step in range(args.warmup + args.steps):
        for v in (variants if step % 2 == 0 else variants[::-1]):  # neither always runs first
            _step(model, v, x, sel_cfg, args, record=step >= args.warmup)
    rss = _rss_mb()
    by_slots = {v.slots: v for v in variants}
    target = by_slots[slots]
    return {"times": target.rows, "ref_times": by_slots[args.ref_slots].rows,
            "peak_rss_mb": rss["VmHWM"] if peak_reset else None, "rss_mb": rss["VmRSS"],
            "setup_peak_rss_mb": setup_peak,
            "shard_rows": target.tables[0].row_end - target.tables[0].row_start,
            "bytes_sent": dict(getattr(target.tables[0], "bytes_sent", {}))}


def run_one(args, slots: int) -> dict:
    backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    ranks = run_ranks(_rank_body, args.world, args, slots, timeout=3600, backend=backend, pg_timeout_s=1200,
                      threads=args.threads)
    med, worst = _summarise([r["times"] for r in ranks])
    ref_med, ref_worst = _summarise([r["ref_times"] for r in ranks])
    return {
        "slots": slots, "n_keys": math.isqrt(slots), "median_step_s": med["step"],
        "median_s": {k: med[k] for k in ("forward", "keys", "select", "backward", "update")},
        # paired: the reference layer's steps alternate with these under the same load
        "ref_slots": args.ref_slots, "ref_median_step_s": ref_med["step"],
        "step_ratio_vs_ref": statistics.median(a / b for a, b in zip(worst["step"], ref_worst["step"])),
        "sparse_overhead_fraction": (med["select"] + med["update"]) / med["step"],
        "keys_fraction": med["keys"] / med["step"],
        "candidates": med["candidates"], "selected": med["selected"],
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
        "setup_peak_rss_mb_per_rank": [r["setup_peak_rss_mb"] for r in ranks],
        "shard_rows_per_rank": [r["shard_rows"] for r in ranks],
        "bytes_sent_per_rank_total": [r["bytes_sent"] for r in ranks],
    }


def _summarise(per_rank_rows: list[list[dict]]) -> tuple[dict, dict]:
    """-> (median of each timing, per-step worst-rank series). A step ends with collectives, so
    the slowest rank decides its time."""
    steps = list(zip(*per_rank_rows))
    worst = {k: [max(rk[k] for rk in step) for step in steps] for k in steps[0][0]}
    return {k: statistics.median(v) for k, v in worst.items()}, worst


def add_step_args(p: argparse.ArgumentParser, value_dim: int) -> None:
    """The world, the step loop and the model of the benchmark step (`_dense_model`, `_add_variant`)."""
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--background", type=int, default=4, help="background batches for the df index")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--k-dim", dest="k_dim", type=int, default=128)
    p.add_argument("--value-dim", dest="value_dim", type=int, default=value_dim)
    p.add_argument("--top-t", dest="top_t", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", default="1048576,4194304,16777216", help="comma-separated square numbers")
    p.add_argument("--json", default=None, help="write the results here")
    add_step_args(p, value_dim=32)
    p.add_argument("--ref-slots", dest="ref_slots", type=int, default=None,
                   help="reference layer run alternately with each size (default: the smallest --slots)")
    args = p.parse_args(argv)
    slot_list = [int(s) for s in args.slots.split(",")]
    args.ref_slots = args.ref_slots or min(slot_list)
    results = []
    for slots in slot_list:
        r = run_one(args, slots)
        results.append(r)
        print(f"slots {slots:>10,}: step {r['median_step_s'] * 1e3:8.1f} ms  "
              f"x{r['step_ratio_vs_ref']:.3f} vs {args.ref_slots:,} slots  "
              f"count+select+update {100 * r['sparse_overhead_fraction']:5.2f}%  "
              f"key scoring {100 * r['keys_fraction']:5.1f}%  peak RSS/rank (MiB) {r['peak_rss_mb_per_rank']}\n"
              f"    median s: {json.dumps({k: round(v, 4) for k, v in r['median_s'].items()})}", flush=True)
    write_results(args.json, "finetune_step", args, results)
    print(json.dumps([{k: r[k] for k in ("slots", "median_step_s", "step_ratio_vs_ref",
                                         "sparse_overhead_fraction", "keys_fraction")} for r in results], indent=1))


if __name__ == "__main__":
    main()
