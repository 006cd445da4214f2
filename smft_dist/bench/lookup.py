"""Benchmark the row-sharded sparse all-to-all lookup against the alternatives (docs/design.md §2.3).

    python -m smft_dist.bench.lookup --world 2 --slots 16777216 --value-dim 32 --tokens 1024 \\
        --k 32 --skew zipf --json benchmarks/results/lookup_16M_zipf.json

Spawns `world` gloo ranks on this machine. Every rank draws the same global batch of T tokens x
K slot ids (and lookup weights), runs its slice through `ShardedValueTable.embedding_bag` and a
backward, and counts the bytes it really put on the wire (`table.bytes_sent`, from the split
sizes). One process holding the whole table (`LocalValueTable`) then runs the whole batch.

Shape legend: T tokens, K slots per token, D value dim, N slots (rows), W world size,
U unique ids, e bytes per element.

Reported (bytes are per rank per step, fwd + bwd, max over ranks):
- bytes_sent_per_step: measured;
- lower_bound_bytes: (rows this rank serves to others + remote rows it asks for) x D x e: every
  remote unique row must cross once forward (the row) and once backward (its gradient);
- allgather_table_bytes: N x D x e x (W-1)/W, what each rank receives to gather the table;
- allreduce_dense_grad_bytes: 2 x (W-1)/W x N x D x e, a ring all-reduce of a dense N x D grad;
- sharded_s / local_s: median fwd+bwd seconds (sharded: slowest rank per step).
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


def step(table, idx_TK, w_TK, g_TD):
    """One fwd + bwd lookup; -> (y_TD, grad of w_TK)."""
    table.zero_step()
    w = w_TK.clone().requires_grad_(True)
    y = table.embedding_bag(idx_TK, w)
    (y * g_TD).sum().backward()
    return y.detach(), w.grad


def _rank_body(rank, world, args) -> dict:
    table = ShardedValueTable(args.slots, args.value_dim, group=dist.group.WORLD, dtype=DTYPES[args.dtype])
    table.reset_parameters(torch.Generator().manual_seed(args.seed))
    idx_TK, w_TK, g_TD = global_batch(args)
    sl = rank_slice(rank, world, args.tokens)
    times = []
    for it in range(args.warmup + args.iters):
        dist.barrier()
        before = sum(table.bytes_sent.values())
        t0 = time.perf_counter()
        y, w_grad = step(table, idx_TK[sl], w_TK[sl], g_TD[sl])
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        if it >= args.warmup:
            times.append(elapsed.item())
        sent = sum(table.bytes_sent.values()) - before
    # lower bound from the ids: remote rows asked for, and rows served to the other ranks
    asked = int((~table.owns(torch.unique(idx_TK[sl]))).sum())
    served = sum(int(table.owns(torch.unique(idx_TK[rank_slice(q, world, args.tokens)])).sum())
                 for q in range(world) if q != rank)
    ids, grad = table.sparse_grad()
    return dict(times=times, sent=sent, asked=asked, served=served, y=y, w_grad=w_grad,
                grad_ids=ids + table.row_start, grad=grad)


def run_local(args) -> tuple[list[float], tuple, torch.Tensor]:
    """-> (step seconds, (y_TD, grad of w_TK, value grad ids, value grad), idx_TK) of one process."""
    torch.set_num_threads(args.local_threads)
    table = LocalValueTable(args.slots, args.value_dim, dtype=DTYPES[args.dtype])
    table.reset_parameters(torch.Generator().manual_seed(args.seed))
    idx_TK, w_TK, g_TD = global_batch(args)
    times = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        y, w_grad = step(table, idx_TK, w_TK, g_TD)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, (y, w_grad, *table.sparse_grad()), idx_TK


def max_abs_err(args, ranks: list[dict], local: tuple) -> float:
    """Largest difference sharded vs local over outputs, lookup-weight and value gradients."""
    y, w_grad, grad_ids, grad = local
    errs = [0.0]
    for r, res in enumerate(ranks):
        sl = rank_slice(r, args.world, args.tokens)
        for mine, ref in ((res["y"], y[sl]), (res["w_grad"], w_grad[sl])):
            if mine.numel():
                errs.append((mine - ref).abs().max().item())
    if not torch.equal(torch.cat([res["grad_ids"] for res in ranks]), grad_ids):
        raise AssertionError("sharded and local gradients touch different rows")
    errs.append((torch.cat([res["grad"] for res in ranks]) - grad).abs().max().item())
    return max(errs)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--slots", type=int, default=1 << 20)
    p.add_argument("--value-dim", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1024, help="global batch tokens")
    p.add_argument("--k", type=int, default=32, help="slot ids per token (heads x knn)")
    p.add_argument("--skew", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-threads", type=int, default=1,
                   help="threads of the one-process baseline (each sharded rank uses 1)")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)

    ranks = run_ranks(_rank_body, args.world, args, timeout=3600, pg_timeout_s=600)
    local_times, local, idx_TK = run_local(args)
    err = max_abs_err(args, ranks, local)
    elem = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    W, N, D = args.world, args.slots, args.value_dim
    lower = [(res["asked"] + res["served"]) * D * elem for res in ranks]
    sent = [res["sent"] for res in ranks]
    sharded_s = statistics.median(ranks[0]["times"])
    local_s = statistics.median(local_times)
    unique = int(torch.unique(idx_TK).numel())
    out = dict(
        world=W, slots=N, value_dim=D, tokens=args.tokens, k=args.k, skew=args.skew, dtype=args.dtype,
        iters=args.iters, unique_rows=unique, touched_fraction=unique / N,
        bytes_sent_per_step=max(sent), bytes_sent_per_rank=sent,
        lower_bound_bytes=max(lower), lower_bound_per_rank=lower,
        bytes_over_lower_bound=max(s / lb if lb else 1.0 for s, lb in zip(sent, lower)),
        allgather_table_bytes=int(N * D * elem * (W - 1) / W),
        allreduce_dense_grad_bytes=int(2 * (W - 1) / W * N * D * elem),
        sharded_s=sharded_s, local_s=local_s, sharded_over_local=sharded_s / local_s,
        max_abs_err=err,
        formulas=dict(
            lower_bound_bytes="(remote rows asked + rows served to other ranks) x D x elem, per rank, max",
            allgather_table_bytes="N x D x elem x (W-1)/W received per rank",
            allreduce_dense_grad_bytes="2 x (W-1)/W x N x D x elem per rank (ring)",
            sharded_s="median over iters of the slowest rank's fwd+bwd (1 thread per rank)",
            local_s=f"median fwd+bwd of one process on the whole batch ({args.local_threads} thread(s))",
        ),
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "formulas"}, indent=2))
    return out


if __name__ == "__main__":
    main()
