"""Owner-side pooling (dist.memory_exchange=pooled) against the unique-row exchange and one process.

Tolerances. Both exchanges compute y[t] = sum_k w[t, k] V[id] in fp32 from the same fp32 (or
bf16-stored, upcast) rows; they differ only in the order of the K <= 6 products' sum (pooled:
per owner, then the M partials) and of the D = 8 products of a weight gradient's dot product.
Each order changes a sum of n terms of size <= S by at most n x 2^-24 x S (S <= sum |w| |V| < 6 x 1
here: weights in [0, 1), |V| < 1 for N(0, 8^-1/2) draws to ~3 sigma), so 1e-5 absolute covers
every case with margin. Counts are integers: exact. Row gradients sum the same products w x g
per row in an order fixed by the entries (pooled: by owner sort; rows: by requester), same bound.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from smft_dist.config import ConfigError, DistConfig, load_config
from smft_dist.distributed import context_from_group
from smft_dist.memory import LocalValueTable
from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.memory.values import counting_accesses
from tests.dist.helpers import run_ranks
from tests.conftest import ROOT

N, D = 49, 8  # uneven shards: 25 + 24 over 2 ranks, 17 + 16 + 16 over 3
ATOL = 1e-5  # see the module docstring


def _lookup(table, idx_TK, w_TK, g_TD, restrict=None, frozen_weights=False):
    """One training lookup + backward -> (y, grad of w, row grad (global ids, rows), counts).
    frozen_weights: the weights need no gradient (finetuning's frozen query and keys)."""
    table.zero_step()
    table.restrict_grad_to(restrict)
    w = w_TK.clone().requires_grad_(not frozen_weights)
    y = table.embedding_bag(idx_TK, w)
    (y * g_TD).sum().backward()
    ids, grad = table.sparse_grad()
    c_ids, counts = table.access_counts()
    return y.detach(), w.grad, ids + table.row_start, grad, c_ids + table.row_start, counts


def _pooled_vs_rows_body(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    tables = {}
    for ex in ("rows", "pooled"):
        tables[ex] = ShardedValueTable(N, D, group=dist.group.WORLD, dtype=dtype, exchange=ex)
        tables[ex].reset_parameters(torch.Generator().manual_seed(0))
    ref = LocalValueTable(N, D, dtype=dtype)
    ref.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    T, K = 10, 6
    sizes = [T, 0] if world == 2 else [4, 0, 6]  # rank 1 has no tokens
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    for restrict, frozen in ((None, False), (torch.tensor([2, 3, 24, 25, 40, 48]), False),
                             (torch.tensor([2, 3, 24, 25, 40, 48]), True)):
        idx_TK, w_TK, g_TD = torch.randint(0, N, (T, K), generator=g), torch.rand(T, K, generator=g), torch.randn(T, D, generator=g)
        got = {ex: _lookup(t, idx_TK[sl], w_TK[sl], g_TD[sl], restrict, frozen) for ex, t in tables.items()}
        assert tables["pooled"].last_exchange == "pooled" and tables["rows"].last_exchange == "rows"
        want = _lookup(ref, idx_TK, w_TK, g_TD, restrict, frozen)
        lo, hi = tables["rows"].row_start, tables["rows"].row_end
        for ex in ("pooled", "rows"):
            y, w_grad, ids, grad, c_ids, counts = got[ex]
            torch.testing.assert_close(y, want[0][sl], atol=ATOL, rtol=0)
            if frozen:
                assert w_grad is None and want[1] is None
            else:
                torch.testing.assert_close(w_grad, want[1][sl], atol=ATOL, rtol=0)
            mine = (want[2] >= lo) & (want[2] < hi)
            assert torch.equal(ids, want[2][mine]), ex
            torch.testing.assert_close(grad, want[3][mine], atol=ATOL, rtol=0)
            mine = (want[4] >= lo) & (want[4] < hi)
            assert torch.equal(c_ids, want[4][mine]) and torch.equal(counts, want[5][mine]), ex
        for a, b in zip(got["pooled"], got["rows"]):
            if a is not None:
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)

    # inference records no counts and builds no graph; the df pass (counting_accesses) records them
    idx_TK = torch.randint(0, N, (T, K), generator=g)
    for ex, t in tables.items():
        t.zero_step()
        with torch.no_grad():
            y = t.embedding_bag(idx_TK[sl], torch.rand(sizes[rank], K))
            assert y.grad_fn is None and t.access_counts()[0].numel() == 0, ex
            with counting_accesses([t]):
                t.embedding_bag(idx_TK[sl], torch.rand(sizes[rank], K))
    pooled_counts, rows_counts = tables["pooled"].access_counts(), tables["rows"].access_counts()
    assert all(torch.equal(a, b) for a, b in zip(pooled_counts, rows_counts))
    assert int(dist_sum(pooled_counts[1].sum())) == T * K  # every entry counted once, at its owner


def dist_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


@pytest.mark.parametrize("world,dtype", [(2, "float32"), (3, "float32"), (2, "bfloat16")])
def test_pooled_matches_rows_and_local(world, dtype):
    run_ranks(_pooled_vs_rows_body, world, dtype)


def _auto_body(rank, world):
    """auto picks, per step, the exchange that moves fewer bytes, on every rank alike."""
    tables = {ex: ShardedValueTable(N, D, group=dist.group.WORLD, exchange=ex) for ex in ("auto", "rows", "pooled")}
    g = torch.Generator().manual_seed(3)
    picked = []
    # few tokens over many rows: pooled moves T x D sums; many tokens over a 49-row table: every
    # row is touched, rows moves each row once, pooled moves 200 x D sums
    for T in (4, 200):
        idx_TK, w_TK, g_TD = torch.randint(0, N, (T, 6), generator=g), torch.rand(T, 6, generator=g), torch.randn(T, D, generator=g)
        sent = {}
        for ex, t in tables.items():
            before = sum(t.bytes_sent.values())
            _lookup(t, idx_TK, w_TK, g_TD)
            sent[ex] = int(dist_sum(torch.tensor(sum(t.bytes_sent.values()) - before)))
        choice = tables["auto"].last_exchange
        picked.append(choice)
        other = "rows" if choice == "pooled" else "pooled"
        # auto also sends the 4-column split message before a rows lookup: 32 (M - 1) bytes per rank
        assert sent[choice] <= sent[other], (T, sent)
        assert sent["auto"] == sent[choice] + (32 * (world - 1) * world if choice == "rows" else 0), (T, sent)
    assert picked == ["pooled", "rows"]


def test_auto_picks_the_exchange_that_moves_fewer_bytes():
    run_ranks(_auto_body, 2)


def test_pooled_lookup_saves_no_rows_for_backward():
    """The rows exchange saves the fetched U x D rows for the bag's backward; the pooled lookup saves
    ids, tokens and weights only (one process: mp 1, same code path)."""
    saved = {}
    for ex in ("rows", "pooled"):
        table = ShardedValueTable(N, D, exchange=ex)
        table.reset_parameters(torch.Generator().manual_seed(0))
        shapes = []
        pack = lambda x: (shapes.append((x.dtype, tuple(x.shape))), x)[1]  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            w = torch.rand(12, 6).requires_grad_(True)
            table.embedding_bag(torch.randint(0, N, (12, 6)), w).sum().backward()
        saved[ex] = [s for dt, s in shapes if dt.is_floating_point and len(s) == 2 and s[1] == D]
    assert saved["rows"], "the check must see the rows the unique-row exchange keeps"
    assert saved["pooled"] == [], saved["pooled"]


def test_memory_exchange_key_is_validated():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["dist.memory_exchange=pooled"])
    assert cfg.dist.memory_exchange == "pooled"
    with pytest.raises(ConfigError, match="dist.memory_exchange='pool' is not one of"):
        load_config(ROOT / "configs/model/tiny.yaml", ["dist.memory_exchange=pool"])


def _context_body(rank, world):
    (t,) = [ShardedValueTable.from_context(N, D, context_from_group(DistConfig(memory_exchange="rows")))]
    return t.exchange


def test_context_passes_the_exchange_to_tables():
    assert run_ranks(_context_body, 2) == ["rows", "rows"]


def _autocast_body(rank, world):
    """Under bf16 autocast the partial sums (and grad_y) travel in bf16: half the bytes of the
    bags, and y within bf16 rounding of the fp32 lookup. Bound: each of the M partials p_j is
    rounded once to bf16 (relative error <= 2^-8: round to nearest with 8 significant bits) and
    |p_j| <= sum over its entries of |w| |V|; summing in fp32 adds < 1e-6, so
    |y - y_fp32| <= 2^-8 x S + 1e-6 with S = sum_k |w[t, k]| |V[id[t, k]]| elementwise."""
    ref = LocalValueTable(N, D)
    ref.reset_parameters(torch.Generator().manual_seed(0))
    table = ShardedValueTable(N, D, group=dist.group.WORLD, exchange="pooled")
    table.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(rank)
    idx_TK, w_TK = torch.randint(0, N, (16, 6), generator=g), torch.rand(16, 6, generator=g)
    sent = {}
    for name, on in (("fp32", False), ("bf16", True)):
        before = table.bytes_sent["fwd"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            y = table.embedding_bag(idx_TK, w_TK)
        sent[name] = table.bytes_sent["fwd"] - before
        assert y.dtype == torch.float32  # the lookup weights' dtype, as the local table returns
        if on:
            S = (w_TK.abs()[..., None] * ref.weight[idx_TK].abs()).sum(1)
            assert ((y - ref.embedding_bag(idx_TK, w_TK)).abs() <= S * 2**-8 + 1e-6).all()
    remote_bags = 16 * D  # the other rank's 16 tokens: fp32 4 B, bf16 2 B each
    assert sent["fp32"] - sent["bf16"] == remote_bags * 2, sent


def test_bf16_autocast_halves_the_partial_sums_on_the_wire():
    run_ranks(_autocast_body, 2)


@pytest.mark.parametrize("exchange", ["rows", "pooled"])
def test_lookup_stages_carry_the_shared_profiler_labels(exchange):
    """bench/gpu_check.py times the stages by these record_function names (one process: mp 1)."""
    from torch.profiler import profile

    table = ShardedValueTable(N, D, exchange=exchange)
    table.reset_parameters(torch.Generator().manual_seed(0))
    w = torch.rand(12, 6).requires_grad_(True)
    with profile() as prof:
        table.embedding_bag(torch.randint(0, N, (12, 6)), w).sum().backward()
    names = {e.name for e in prof.events() if e.name.startswith("smft/")}
    assert names == {"smft/exchange_fwd", "smft/bag", "smft/exchange_bwd"}, names
