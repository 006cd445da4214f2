"""ShardedValueTable on real gloo ranks == one process holding the whole table.

Every rank builds the same global batch, runs its own slice (some slices are empty: a rank with
zero tokens), and compares with a single-process reference on the whole batch: outputs, the
gradients of the lookup weights / query / keys (summed over ranks), the row-sparse value gradient
of its shard, and the global access counts.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from smft_dist.config import DistConfig
from smft_dist.distributed import context_from_group, gather_full_table, shard_memory, unshard_memory
from smft_dist.memory import LocalValueTable, ProductKeyMemory
from smft_dist.memory.sharded import ShardedValueTable
from tests.dist.helpers import run_ranks

N_KEYS, D = 7, 8  # 49 rows: uneven shards over 2 (25, 24) and 3 (17, 16, 16) ranks


def _slice(world: int, rank: int, total: int, sizes=None) -> slice:
    """This rank's slice of a global batch; `sizes` (per rank) allows empty slices."""
    sizes = sizes or [total // world + (r < total % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _shard_of(local: LocalValueTable, dtype=torch.float32, exchange="auto") -> ShardedValueTable:
    table = ShardedValueTable(local.num_rows, local.dim, group=dist.group.WORLD, dtype=dtype, exchange=exchange)
    with torch.no_grad():
        table.weight.copy_(local.weight[table.row_start:table.row_end])
    return table


def _check_sparse_state(table: ShardedValueTable, ref: LocalValueTable, atol: float):
    """Row gradient and access counts of this shard == the reference's rows of the shard."""
    lo, hi = table.row_start, table.row_end
    for (ids, vals), (ref_ids, ref_vals), what in ((table.sparse_grad(), ref.sparse_grad(), "gradient"),
                                                    (table.access_counts(), ref.access_counts(), "counts")):
        mine = (ref_ids >= lo) & (ref_ids < hi)
        assert torch.equal(ids + lo, ref_ids[mine]), f"rows with {what} != rows touched"
        torch.testing.assert_close(vals, ref_vals[mine], atol=atol, rtol=1e-6)
    assert table.weight.grad is None


def _assert_counts_are_bincount(ref: LocalValueTable, global_ids: torch.Tensor):
    ids, counts = ref.access_counts()
    full = torch.bincount(global_ids.reshape(-1), minlength=ref.num_rows)  # fine in a test: N = 49
    assert torch.equal(ids, full.nonzero().squeeze(1)) and torch.equal(counts, full[ids])


# ----- the table alone: hand-made ids (uniform, skewed onto one owner, duplicates, empty ranks) -----
def _pooled_bytes(table: ShardedValueTable, idx_TK: torch.Tensor, sizes, world: int) -> int:
    """Exact wire bytes of one fp32 pooled lookup + backward with weight gradients (sharded.py
    _PooledLookup): the (M-1) x 4 int64 split message; per entry sent to a remote owner its
    (int32 local id, int32 token, fp32 weight) = 12 and its fp32 weight gradient (4) from the
    owner; per remote requester that sent this rank entries, its T_j x D fp32 partial sums; per
    remote owner this rank sent entries, its T x D fp32 grad_y."""
    per_rank = [idx_TK[_slice(world, q, idx_TK.shape[0], sizes)] for q in range(world)]
    owner_of = [table.plan.owner_of(ids.reshape(-1)) for ids in per_rank]
    me, T = table.mp_rank, per_rank[table.mp_rank].shape[0]
    sent_remote = int((owner_of[me] != me).sum())
    got_remote = sum(int((owner_of[q] == me).sum()) for q in range(world) if q != me)
    partials = sum(per_rank[q].shape[0] * D * 4 for q in range(world) if q != me and (owner_of[q] == me).any())
    grad_y = sum(T * D * 4 for j in range(world) if j != me and (owner_of[me] == j).any())
    return 32 * (world - 1) + 12 * sent_remote + partials + grad_y + 4 * got_remote


def _table_body(rank, world, dtype_name, exchange="rows"):
    dtype = getattr(torch, dtype_name)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    ref = LocalValueTable(N_KEYS**2, D, dtype=dtype)
    ref.reset_parameters(torch.Generator().manual_seed(0))
    table = ShardedValueTable(N_KEYS**2, D, group=dist.group.WORLD, dtype=dtype, exchange=exchange)
    table.reset_parameters(torch.Generator().manual_seed(0))  # drawn shard == rows of the full draw
    assert torch.equal(table.weight, ref.weight[table.row_start:table.row_end])

    g = torch.Generator().manual_seed(1)
    T, K = 12, 6
    cases = {
        "uniform": (torch.randint(0, 49, (T, K), generator=g), None),
        "skew_first_owner": (torch.randint(0, 3, (T, K), generator=g), None),  # other owners get nothing
        "skew_last_owner": (torch.randint(46, 49, (T, K), generator=g), None),
        "one_rank_has_all": (torch.randint(0, 49, (T, K), generator=g), [T] + [0] * (world - 1)),
        "first_rank_empty": (torch.randint(0, 49, (T, K), generator=g), [0] * (world - 1) + [T]),
        "middle_empty": (torch.randint(0, 49, (T, K), generator=g), [T - 5] + [0] * (world - 2) + [5]),
    }
    for name, (idx_TK, sizes) in cases.items():
        for restrict in (None, torch.tensor([0, 1, 2, 20, 30, 47, 48])):
            w_TK = torch.rand(T, K, generator=g)
            g_TD = torch.randn(T, D, generator=g)
            ref.zero_step(), table.zero_step()
            ref.restrict_grad_to(restrict), table.restrict_grad_to(restrict)
            w_ref = w_TK.clone().requires_grad_(True)
            y_ref = ref.embedding_bag(idx_TK, w_ref)
            (y_ref * g_TD).sum().backward()

            sl = _slice(world, rank, T, sizes)
            w = w_TK[sl].clone().requires_grad_(True)
            before = sum(table.bytes_sent.values())
            y = table.embedding_bag(idx_TK[sl], w)
            (y * g_TD[sl]).sum().backward()
            torch.testing.assert_close(y, y_ref[sl], atol=atol, rtol=1e-6, msg=name)
            torch.testing.assert_close(w.grad, w_ref.grad[sl], atol=atol, rtol=1e-6, msg=name)
            _assert_counts_are_bincount(ref, idx_TK)
            _check_sparse_state(table, ref, atol)
            assert table.last_exchange == exchange
            if restrict is None and dtype == torch.float32 and exchange == "pooled":
                assert sum(table.bytes_sent.values()) - before == _pooled_bytes(table, idx_TK, sizes, world), name
            if restrict is None and dtype == torch.float32 and exchange == "rows":
                # exact wire bytes: (split size, out-of-range count) and (split size, reuse) to
                # each other rank, (M-1) x 16 forward and backward; per
                # remote unique row requested: id + count (16) out, its gradient (4 D) back; per
                # row served to another rank: the row (4 D)
                asked = (~table.owns(torch.unique(idx_TK[sl]))).sum()
                served = sum(table.owns(torch.unique(idx_TK[_slice(world, q, T, sizes)])).sum()
                             for q in range(world) if q != rank)
                expect = int(asked) * (16 + 4 * D) + int(served) * 4 * D + 32 * (world - 1)
                assert sum(table.bytes_sent.values()) - before == expect, name

    # Direct calls with unsorted ids (embedding_bag always passes sorted ones).
    table.zero_step()
    ids_of = [[40, 3, 17, 48, 0]] + [[5, 33]] * (world - 1)  # rank q pushes gradient rows of value q + 1
    ids = torch.tensor(ids_of[rank])
    rows = table.fetch(ids, torch.ones_like(ids))
    torch.testing.assert_close(rows, ref.weight[ids], atol=0, rtol=0)
    table.push_grad(ids, torch.full((len(ids), D), float(rank + 1)))
    expect = {}
    for q, q_ids in enumerate(ids_of):
        for i in q_ids:
            if table.row_start <= i < table.row_end:
                expect[i - table.row_start] = expect.get(i - table.row_start, 0.0) + q + 1
    got_ids, got = table.sparse_grad()
    assert dict(zip(got_ids.tolist(), got[:, 0].tolist())) == expect

    with pytest.raises(IndexError, match="outside"):
        table.embedding_bag(torch.tensor([[3, 49]]), torch.ones(1, 2))


@pytest.mark.parametrize("exchange", ["rows", "pooled"])
@pytest.mark.parametrize("world", [2, 3])
def test_table_matches_local(world, exchange):
    run_ranks(_table_body, world, "float32", exchange)


@pytest.mark.parametrize("exchange", ["rows", "pooled"])
def test_table_bf16_storage(exchange):
    run_ranks(_table_body, 2, "bfloat16", exchange)


# ----- the memory layer: outputs and gradients of query, keys, values -----
def _layer_inputs(kind: str, B: int, S: int, C: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if kind == "uniform":
        return torch.randn(B, S, C, generator=g)
    # skewed: every token is one of two vectors, so a few slots get almost every access
    protos = torch.randn(2, C, generator=g)
    return protos[torch.randint(0, 2, (B, S), generator=g)]


def _layer_body(rank, world, kind, exchange):
    torch.manual_seed(0)
    C, B, S = 16, 5, 4
    ref = ProductKeyMemory(C, N_KEYS, heads=2, knn=3, k_dim=8, value_dim=D)
    layer = copy.deepcopy(ref)
    layer.set_value_table(_shard_of(ref.values, exchange=exchange), register=False)
    x_BSC = _layer_inputs(kind, B, S, C)
    g_BSC = torch.randn(B, S, C, generator=torch.Generator().manual_seed(3))
    mask_BS = torch.ones(B, S, dtype=torch.bool)
    mask_BS[1, 2:] = False  # padding makes no accesses

    ref.token_mask = mask_BS
    out_ref = ref(x_BSC)
    (out_ref * g_BSC).sum().backward()
    slots = ref.keys(x_BSC[mask_BS])[0]  # the global batch's slot ids

    sl = _slice(world, rank, B, [2, 3] if world == 2 else [2, 0, 3])  # world 3: rank 1 has no tokens
    layer.token_mask = mask_BS[sl]
    out = layer(x_BSC[sl])
    (out * g_BSC[sl]).sum().backward()
    torch.testing.assert_close(out, out_ref[sl], atol=1e-6, rtol=1e-6)
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) - {n for n, _ in layer.named_parameters()} == {"values.weight"}
    for name, p in layer.named_parameters():
        grad, p_ref = p.grad.clone(), ref_params[name]
        dist.all_reduce(grad)  # each rank has the gradient of its slice's loss
        torch.testing.assert_close(grad, p_ref.grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    _assert_counts_are_bincount(ref.values, slots)
    _check_sparse_state(layer.values, ref.values, atol=1e-6)


@pytest.mark.parametrize("world,kind,exchange", [(2, "uniform", "rows"), (3, "uniform", "rows"), (3, "skewed", "rows"),
                                                 (2, "uniform", "pooled"), (3, "skewed", "pooled")])
def test_memory_layer_matches_unsharded(world, kind, exchange):
    run_ranks(_layer_body, world, kind, exchange)


# ----- replicas: world = dp_replicate x mp, replicas sum their sparse gradients and counts -----
def _replica_body(rank, world, mp, exchange):
    ctx = context_from_group(DistConfig(mp=mp, dp_replicate=world // mp, memory_exchange=exchange))
    ref = LocalValueTable(N_KEYS**2, D)
    ref.reset_parameters(torch.Generator().manual_seed(0))
    table = ShardedValueTable.from_context(N_KEYS**2, D, ctx)
    table.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(4)
    T, K = 12, 6
    idx_TK, w_TK, g_TD = torch.randint(0, 49, (T, K), generator=g), torch.rand(T, K, generator=g), torch.randn(T, D, generator=g)
    (ref.embedding_bag(idx_TK, w_TK) * g_TD).sum().backward()

    sl = _slice(world, rank, T, [4, 8] if world == 2 else [4, 0, 5, 3])
    y = table.embedding_bag(idx_TK[sl], w_TK[sl])
    table.sync_replicas()  # after the forward: the counts (what selection does)
    (y * g_TD[sl]).sum().backward()
    table.sync_replicas()  # after the backward: the gradients; the counts are not summed twice
    table.sync_replicas()
    assert table.last_exchange == exchange
    _check_sparse_state(table, ref, atol=1e-6)


@pytest.mark.parametrize("exchange", ["rows", "pooled"])
@pytest.mark.parametrize("world,mp", [(2, 1), (4, 2)])
def test_replicas_combine_gradients_and_counts(world, mp, exchange):
    run_ranks(_replica_body, world, mp, exchange)


# ----- the whole model: logits, loss and value gradients; shard -> unshard round trip -----
def _tiny_model(n_keys: int = N_KEYS):
    from smft_dist.model import SmftConfig, SmftForCausalLM

    torch.manual_seed(0)  # every rank builds the same model
    cfg = SmftConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, memory_layers=[1], memory_n_keys=n_keys, memory_heads=2,
                     memory_knn=3, memory_k_dim=8, memory_value_dim=D, pad_token_id=0)
    return SmftForCausalLM(cfg)


def _sum_loss(model, ids_BS, mask_BS):
    """-> (logits, summed next-token cross-entropy over real tokens: 0 for an all-padding batch)."""
    logits = model(input_ids=ids_BS, attention_mask=mask_BS).logits
    labels = ids_BS.masked_fill(mask_BS == 0, -100)[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
    return logits, loss


def _model_body(rank, world, exchange):
    model = _tiny_model()
    ref = copy.deepcopy(model)
    (table,) = shard_memory(model, context_from_group(DistConfig(memory_exchange=exchange)))
    assert all(p is not table.weight for p in model.parameters())
    assert not any("values" in k for k in model.state_dict()), "the shard must stay out of the engine's view"

    g = torch.Generator().manual_seed(5)
    ids_BS = torch.randint(3, 64, (5, 6), generator=g)
    mask_BS = torch.ones(5, 6, dtype=torch.long)
    mask_BS[2] = 0  # all padding: with world 3, rank 1 makes no memory lookup at all
    mask_BS[3, :2] = 0  # left padding
    sizes = [2, 3] if world == 2 else [2, 1, 2]
    sl = _slice(world, rank, 5, sizes)
    logits, loss = _sum_loss(model, ids_BS[sl], mask_BS[sl])
    loss.backward()
    # The reference runs every rank's slice: the sum of the slice losses is the sharded objective.
    ref_total = 0.0
    for q in range(world):
        sq = _slice(world, q, 5, sizes)
        ref_logits, ref_loss = _sum_loss(ref, ids_BS[sq], mask_BS[sq])
        if q == rank:
            valid = mask_BS[sl].bool()
            torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
        ref_total = ref_total + ref_loss
    ref_total.backward()
    assert table.last_exchange == exchange
    _check_sparse_state(table, ref.memory_layers()[0].values, atol=1e-6)

    full = gather_full_table(table)
    unshard_memory(model)
    torch.testing.assert_close(full, ref.memory_layers()[0].values.weight, atol=0, rtol=0)
    key = "model.layers.1.mlp.values.weight"
    torch.testing.assert_close(model.state_dict()[key], ref.state_dict()[key], atol=0, rtol=0)


@pytest.mark.parametrize("exchange", ["rows", "pooled"])
@pytest.mark.parametrize("world", [2, 3])
def test_model_matches_unsharded(world, exchange):
    run_ranks(_model_body, world, exchange)


# ----- a real dense engine never sees the shard -----
def _deepspeed_body(rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # reuses run_ranks' process group
    model = _tiny_model(n_keys=8)  # 64 rows: shards of equal shape (a broadcast would not fail)
    (table,) = shard_memory(model, context_from_group())
    shard0 = table.weight.detach().clone()
    shards = [torch.empty_like(shard0) for _ in range(world)]
    dist.all_gather(shards, shard0)
    assert not torch.equal(shards[0], shards[1])
    dense0 = model.lm_head.weight.detach().clone()
    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids_BS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(rank))  # per-rank data
    loss = engine(input_ids=ids_BS, labels=ids_BS).loss
    engine.backward(loss)
    engine.step()
    assert torch.equal(table.weight, shard0), "the engine changed (broadcast?) this rank's shard"
    assert table.weight.grad is None and table.sparse_grad()[0].numel() > 0
    dense1 = model.lm_head.weight.detach().clone()
    assert not torch.equal(dense1, dense0), "the engine did not step"
    others = [torch.empty_like(dense1) for _ in range(world)]
    dist.all_gather(others, dense1)
    assert all(torch.equal(o, dense1) for o in others), "dense weights diverged across ranks"


def test_deepspeed_zero1_leaves_shards_alone():
    run_ranks(_deepspeed_body, 2)


def _fsdp2_body(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _tiny_model(n_keys=8)
    (table,) = shard_memory(model, context_from_group())
    shard0 = table.weight.detach().clone()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids_BS = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids_BS, labels=ids_BS).loss.backward()
    opt.step()
    assert torch.equal(table.weight, shard0) and table.weight.grad is None
    assert table.sparse_grad()[0].numel() > 0


def test_fsdp2_leaves_shards_alone():
    run_ranks(_fsdp2_body, 2)
