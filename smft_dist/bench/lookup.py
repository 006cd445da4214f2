"""Benchmark the row-sharded sparse all-to-all lookup against the alternatives (docs/design.md §2.3).

    python -m smft_dist.bench.lookup --world 2 --slots 16777216 --value-dim 32 --tokens 1024 \\
        --k 32 --skew zipf --json benchmarks/results/lookup_16M_zipf.json

The unique-row exchange against owner-side pooling (docs/memory_exchange.md), in the same run:

    python -m smft_dist.bench.lookup --world 2 --slots 1048576 --value-dim 256 --tokens 4096 --k 128 \
        --no-local --json benchmarks/results/lookup_pretrain_pooled_vs_rows.json
    python -m smft_dist.bench.lookup --world 2 --slots 1048576 --value-dim 256 --tokens 300 --k 128 \
        --restrict 500 --frozen-weights --no-local --json benchmarks/results/lookup_finetune_pooled_vs_rows.json

Spawns `world` gloo ranks on this machine. Every rank draws the same global batch of T tokens x
K slot ids (and lookup weights), runs its slice through `ShardedValueTable.embedding_bag` and a
backward with each exchange of `--exchanges` in turn (alternating every step, so both see the same
machine load), and counts the bytes it really put on the wire (`table.bytes_sent`, from the split
sizes). One process holding the whole table (`LocalValueTable`) then runs the whole batch, unless
--no-local. `--restrict t` limits row gradients to t touched rows (finetuning's top-t);
`--frozen-weights`: the lookup weights need no gradient (frozen query and keys, as in finetuning).

Shape legend: T tokens, K slots per token, D value dim, N slots (rows), W world size,
U unique ids, e bytes per element.

Reported (bytes are per rank per step, fwd + bwd, max over ranks):
- bytes_sent_per_step: measured;
- lower_bound_bytes: (rows this rank serves to others + remote rows it asks for) x D x e: every
  remote unique row must cross once forward (the row) and once backward (its gradient);
- allgather_table_bytes: N x D x e x (W-1)/W, what each rank receives to gather the table;
- allreduce_dense_grad_bytes: 2 x (W-1)/W x N x D x e, a ring all-reduce of a dense N x D grad;
- sharded_s / local_s: median fwd+bwd seconds (sharded: slowest rank per step).
The keys above describe the first exchange of `--exchanges` (rows by default); `exchanges` holds
every exchange's bytes, time and bound, and `pooled_over_rows` their ratios, when both ran:
- pooled lower bound: (remote entries x (4 B id + e weight) + remote owners touched x T x D x e
  partial sums) forward, the T x D x e grad_y to each remote owner backward (+ e per remote entry
  when the weights want gradients): the least that names each slot once and moves the bag.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from smft_dist.distributed.spawn import run_ranks
from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.memory.values import DTYPES, LocalValueTable


def global_batch(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (idx_TK, w_TK, g_TD): the same on every rank. zipf: log-uniform ranks (Zipf exponent 1)
    scattered over the table by an odd multiplicative hash (a bijection when N is a power of 2),
    so the hot rows do not all sit on one shard."""
    g = torch.Generator().manual_seed(args.seed)
    T, K, N = args.tokens, args.k, args.slots
    if args.skew == "uniform":
        idx_TK = torch.randint(0, N, (T, K), generator=g)
    else:
        r_TK = torch.exp(torch.rand(T, K, generator=g, dtype=torch.float64) * math.log(N)).long() - 1
        idx_TK = (r_TK.clamp(0, N - 1) * 2654435761) % N
    w_TK = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    g_TD = torch.randn(T, args.value_dim, generator=g)
    return idx_TK, w_TK, g_TD


def rank_slice(rank: int, world: int, T: int) -> slice:
    per = -(-T // world)
    return slice(min(rank * per, T), min((rank + 1) * per, T))


def step(table, idx_TK, w_TK, g_TD, restrict=None, frozen_weights=False):
    """One fwd + bwd lookup; -> (y_TD, grad of w_TK or None)."""
    table.zero_step()
    table.restrict_grad_to(restrict)
    w = w_TK.clone().requires_grad_(not frozen_weights)
    y = table.embedding_bag(idx_TK, w)
    (y * g_TD).sum().backward()
    return y.detach(), w.grad


def restricted_ids(args, idx_TK: torch.Tensor):
    """t of the batch's touched rows (a stand-in for the TF-IDF top-t), or None."""
    if not args.restrict:
        return None
    touched = torch.unique(idx_TK)
    pick = torch.randperm(touched.numel(), generator=torch.Generator().manual_seed(args.seed))[:args.restrict]
    return touched[pick]


def _rank_body(rank, world, args) -> dict:
    exchanges = args.exchanges.split(",")
    tables = {}
    for ex in exchanges:
        tables[ex] = ShardedValueTable(args.slots, args.value_dim, group=dist.group.WORLD, dtype=DTYPES[args.dtype],
                                       exchange=ex)
        tables[ex].reset_parameters(torch.Generator().manual_seed(args.seed))
    idx_TK, w_TK, g_TD = global_batch(args)
    restrict = restricted_ids(args, idx_TK)
    sl = rank_slice(rank, world, args.tokens)
    out = {ex: dict(times=[]) for ex in exchanges}
    for it in range(args.warmup + args.iters):
        for ex in exchanges:
            table = tables[ex]
            dist.barrier()
            before = sum(table.bytes_sent.values())
            t0 = time.perf_counter()
            y, w_grad = step(table, idx_TK[sl], w_TK[sl], g_TD[sl], restrict, args.frozen_weights)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
            if it >= args.warmup:
                out[ex]["times"].append(elapsed.item())
            ids, grad = table.sparse_grad()
            out[ex].update(sent=sum(table.bytes_sent.values()) - before, y=y, w_grad=w_grad,
                           grad_ids=ids + table.row_start, grad=grad, used=table.last_exchange)
    table = next(iter(tables.values()))
    # lower bounds from the ids
    mine = idx_TK[sl]
    asked = int((~table.owns(torch.unique(mine))).sum())
    served = sum(int(table.owns(torch.unique(idx_TK[rank_slice(q, world, args.tokens)])).sum())
                 for q in range(world) if q != rank)
    owners = table.plan.owner_of(mine.reshape(-1))
    remote_entries = int((owners != table.mp_rank).sum())
    remote_owners = sum(1 for j in range(world) if j != table.mp_rank and bool((owners == j).any()))
    got_entries = sum(int((table.plan.owner_of(idx_TK[rank_slice(q, world, args.tokens)]) == rank).sum())
                      for q in range(world) if q != rank)
    served_bags = sum(rank_slice(q, world, args.tokens).stop - rank_slice(q, world, args.tokens).start
                      for q in range(world) if q != rank
                      and bool((table.plan.owner_of(idx_TK[rank_slice(q, world, args.tokens)]) == rank).any()))
    return dict(per=out, asked=asked, served=served, remote_entries=remote_entries, remote_owners=remote_owners,
                got_entries=got_entries, served_bags=served_bags, T=mine.shape[0])


def run_local(args) -> tuple[list[float], tuple, torch.Tensor]:
    """-> (step seconds, (y_TD, grad of w_TK, value grad ids, value grad), idx_TK) of one process."""
    torch.set_num_threads(args.local_threads)
    table = LocalValueTable(args.slots, args.value_dim, dtype=DTYPES[args.dtype])
    table.reset_parameters(torch.Generator().manual_seed(args.seed))
    idx_TK, w_TK, g_TD = global_batch(args)
    restrict = restricted_ids(args, idx_TK)
    times = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        y, w_grad = step(table, idx_TK, w_TK, g_TD, restrict, args.frozen_weights)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, (y, w_grad, *table.sparse_grad()), idx_TK


def max_abs_err(args, ranks: list[dict], ex: str, ref: tuple) -> float:
    """Largest difference of exchange `ex` against `ref` (y, grad of w, value grad ids, value grad:
    whole-batch tensors) over outputs, lookup-weight and value gradients."""
    y, w_grad, grad_ids, grad = ref
    errs = [0.0]
    for r, res in enumerate(ranks):
        sl = rank_slice(r, args.world, args.tokens)
        mine = res["per"][ex]
        for got, want in ((mine["y"], y[sl]), (mine["w_grad"], None if w_grad is None else w_grad[sl])):
            if got is not None and got.numel():
                errs.append((got - want).abs().max().item())
    if not torch.equal(torch.cat([res["per"][ex]["grad_ids"] for res in ranks]), grad_ids):
        raise AssertionError(f"{ex}: the sharded gradients touch other rows than the reference's")
    errs.append((torch.cat([res["per"][ex]["grad"] for res in ranks]) - grad).abs().max().item())
    return max(errs)


def _whole_batch(ranks: list[dict], ex: str) -> tuple:
    """(y, grad of w, value grad ids, value grad) of exchange `ex`, concatenated over ranks."""
    per = [res["per"][ex] for res in ranks]
    w_grads = [p["w_grad"] for p in per]
    return (torch.cat([p["y"] for p in per]), None if w_grads[0] is None else torch.cat(w_grads),
            torch.cat([p["grad_ids"] for p in per]), torch.cat([p["grad"] for p in per]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--slots", type=int, default=1 << 20)
    p.add_argument("--value-dim", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1024, help="global batch tokens")
    p.add_argument("--k", type=int, default=32, help="slot ids per token (heads x knn)")
    p.add_argument("--skew", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--exchanges", default="rows,pooled",
                   help="comma-separated dist.memory_exchange values, measured alternately in the same run")
    p.add_argument("--restrict", type=int, default=0, help="row gradients only for this many touched rows (top-t)")
    p.add_argument("--frozen-weights", action="store_true", help="the lookup weights need no gradient")
    p.add_argument("--no-local", action="store_true", help="skip the one-process baseline")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-threads", type=int, default=1,
                   help="threads of the one-process baseline (each sharded rank uses 1)")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    exchanges = args.exchanges.split(",")

    ranks = run_ranks(_rank_body, args.world, args, timeout=3600, pg_timeout_s=600)
    elem = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    ew = 4  # the lookup weights (and so the partial sums and grad_y) are fp32 here
    W, N, D = args.world, args.slots, args.value_dim
    idx_TK = global_batch(args)[0]
    unique = int(torch.unique(idx_TK).numel())
    bwd_w = 0 if args.frozen_weights else ew
    bounds = {
        "rows": [(res["asked"] + res["served"]) * D * elem for res in ranks],
        "pooled": [res["remote_entries"] * (4 + ew) + res["served_bags"] * D * ew
                   + res["remote_owners"] * res["T"] * D * ew + res["got_entries"] * bwd_w for res in ranks],
    }
    per_exchange = {}
    for ex in exchanges:
        sent = [res["per"][ex]["sent"] for res in ranks]
        lower = bounds.get(ex if ex != "auto" else ranks[0]["per"][ex]["used"])
        per_exchange[ex] = dict(
            used=ranks[0]["per"][ex]["used"], bytes_sent_per_step=max(sent), bytes_sent_per_rank=sent,
            lower_bound_bytes=max(lower), bytes_over_lower_bound=max(s / lb if lb else 1.0 for s, lb in zip(sent, lower)),
            sharded_s=statistics.median(ranks[0]["per"][ex]["times"]))
    first = exchanges[0]
    out = dict(
        world=W, slots=N, value_dim=D, tokens=args.tokens, k=args.k, skew=args.skew, dtype=args.dtype,
        iters=args.iters, restrict=args.restrict, frozen_weights=args.frozen_weights,
        unique_rows=unique, touched_fraction=unique / N,
        bytes_sent_per_step=per_exchange[first]["bytes_sent_per_step"],
        bytes_sent_per_rank=per_exchange[first]["bytes_sent_per_rank"],
        lower_bound_bytes=per_exchange[first]["lower_bound_bytes"],
        bytes_over_lower_bound=per_exchange[first]["bytes_over_lower_bound"],
        allgather_table_bytes=int(N * D * elem * (W - 1) / W),
        allreduce_dense_grad_bytes=int(2 * (W - 1) / W * N * D * elem),
        sharded_s=per_exchange[first]["sharded_s"], exchanges=per_exchange,
    )
    if "rows" in exchanges and "pooled" in exchanges:
        out["pooled_over_rows"] = dict(
            bytes=per_exchange["pooled"]["bytes_sent_per_step"] / per_exchange["rows"]["bytes_sent_per_step"],
            time=per_exchange["pooled"]["sharded_s"] / per_exchange["rows"]["sharded_s"],
            max_abs_diff=max_abs_err(args, ranks, "pooled", _whole_batch(ranks, "rows")))
    if not args.no_local:
        local_times, local, _ = run_local(args)
        out["local_s"] = statistics.median(local_times)
        out["sharded_over_local"] = out["sharded_s"] / out["local_s"]
        out["max_abs_err"] = max(max_abs_err(args, ranks, ex, local) for ex in exchanges)
    out["formulas"] = dict(
        lower_bound_bytes="rows: (remote rows asked + rows served to other ranks) x D x elem; pooled: remote "
                          "entries x (4 + 4) + bags served to other ranks x D x 4 + remote owners touched x T x D "
                          "x 4 + (entries received from other ranks x 4 when the weights want gradients); per rank, max",
        allgather_table_bytes="N x D x elem x (W-1)/W received per rank",
        allreduce_dense_grad_bytes="2 x (W-1)/W x N x D x elem per rank (ring)",
        sharded_s="median over iters of the slowest rank's fwd+bwd (1 thread per rank)",
        local_s=f"median fwd+bwd of one process on the whole batch ({args.local_threads} thread(s))",
        pooled_over_rows="bytes: max over ranks of bytes sent per step, pooled / rows; time: the medians' ratio",
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "formulas"}, indent=2))
    return out


if __name__ == "__main__":
    main()
