"""ProductKeyMemory against a brute-force reference that scores all n^2 slots."""
import torch
import pytest

from smft_dist.memory import ProductKeyMemory, brute_force_topk
from smft_dist.memory.product_keys import softmax_weights


def make_layer(n_keys=8, heads=2, knn=4, k_dim=16, value_dim=12, dim=24, qk_norm=False, seed=0):
    torch.manual_seed(seed)
    return ProductKeyMemory(dim, n_keys, heads, knn, k_dim, value_dim, qk_norm=qk_norm)


def reference_output(layer, x_BSC):
    """Dense reference: all n^2 scores, top-k, softmax, dense V gather, swilu."""
    B, S, C = x_BSC.shape
    x = x_BSC.reshape(-1, C)
    slots, scores = brute_force_topk(layer.keys, x)
    w = softmax_weights(scores)
    V = layer.values.weight
    y = (w[..., None] * V[slots]).sum(dim=(1, 2))
    return layer.w2(y * torch.nn.functional.silu(layer.w1(x))).view(B, S, C), slots


@pytest.mark.parametrize("qk_norm", [False, True])
def test_same_slots_and_output_as_brute_force(qk_norm):
    layer = make_layer(qk_norm=qk_norm)
    x = torch.randn(3, 5, 24)
    slots_fast, scores_fast = layer.keys(x.reshape(-1, 24))
    slots_ref, scores_ref = brute_force_topk(layer.keys, x.reshape(-1, 24))
    assert torch.equal(slots_fast, slots_ref)
    torch.testing.assert_close(scores_fast, scores_ref)
    out_ref, _ = reference_output(layer, x)
    torch.testing.assert_close(layer(x), out_ref, atol=1e-6, rtol=1e-5)


def test_gradients_reach_query_keys_values_w1_w2():
    layer = make_layer()
    x = torch.randn(2, 4, 24)
    layer(x).pow(2).sum().backward()
    for name, p in [("query", layer.keys.query.weight), ("keys", layer.keys.keys),
                    ("w1", layer.w1.weight), ("w2", layer.w2.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ids, grad = layer.values.sparse_grad()
    assert ids.numel() > 0 and grad.abs().sum() > 0
    # The gradient of the values matches the dense reference, row for row.
    ref = make_layer()
    V = ref.values.weight.detach().clone().requires_grad_(True)
    xr = x.reshape(-1, 24)
    slots, scores = brute_force_topk(ref.keys, xr)
    y = (softmax_weights(scores)[..., None] * V[slots]).sum(dim=(1, 2))
    ref.w2(y * torch.nn.functional.silu(ref.w1(xr))).pow(2).sum().backward()
    touched = V.grad.abs().sum(1).nonzero().squeeze(1)
    assert torch.equal(ids, touched)
    torch.testing.assert_close(grad, V.grad[ids], atol=1e-6, rtol=1e-5)
    assert layer.values.weight.grad is None  # never a dense N x D gradient


def test_padding_makes_no_accesses():
    layer = make_layer()
    x = torch.randn(2, 6, 24)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :4] = False
    layer.token_mask = mask
    out = layer(x)
    ids, counts = layer.values.access_counts()
    assert int(counts.sum()) == int(mask.sum()) * 2 * 4  # valid tokens x heads x knn
    assert torch.all(out[0, :4] == 0)
    # The valid tokens' outputs equal an unmasked run on them alone.
    layer.token_mask = None
    layer.values.zero_step()
    torch.testing.assert_close(out[1], layer(x[1:])[0])
    slots, _ = brute_force_topk(layer.keys, x[mask])
    assert torch.equal(ids, torch.unique(slots))


def test_counts_equal_bincount():
    layer = make_layer()
    x = torch.randn(4, 3, 24)
    layer(x)
    ids, counts = layer.values.access_counts()
    slots, _ = brute_force_topk(layer.keys, x.reshape(-1, 24))
    ref = torch.bincount(slots.reshape(-1), minlength=64)
    assert torch.equal(ref[ids], counts) and int(counts.sum()) == int(ref.sum())


def test_bf16_values():
    torch.manual_seed(0)
    layer = ProductKeyMemory(24, 8, 2, 4, 16, 12, value_dtype="bfloat16")
    assert layer.values.weight.dtype == torch.bfloat16
    out = layer(torch.randn(2, 3, 24))
    out.sum().backward()
    assert out.dtype == torch.float32 and layer.values.sparse_grad()[1].dtype == torch.float32


def test_out_of_range_ids_rejected():
    layer = make_layer()
    with pytest.raises(IndexError, match="outside"):
        layer.values.embedding_bag(torch.tensor([[0, 64]]), torch.ones(1, 2))


def test_lookup_reads_the_host_once_and_restricts_rows_exactly():
    """One process, grad restricted to some rows: a forward, backward and the step's coalesced
    counts and gradient make 2 host syncs, the lookup's `unique` and the restriction's `nonzero`
    (no id check on the layer's own ids, no merge of a single sorted entry, no boolean masks).
    The restricted gradient is the unrestricted one's allowed rows, bit for bit."""
    from tests.sync_ops import SyncCounter
    x = torch.randn(2, 4, 24)
    layer = make_layer()
    layer(x).pow(2).sum().backward()
    all_ids, all_grad = layer.values.sparse_grad()
    allowed = all_ids[::2].flip(0)  # restrict_grad_to takes them in any order
    layer = make_layer()
    layer.values.restrict_grad_to(allowed)
    with SyncCounter() as syncs:
        layer(x).pow(2).sum().backward()
        ids, grad = layer.values.sparse_grad()
        layer.values.access_counts()
    assert [op for op, _ in syncs.events] == ["aten._unique2.default", "aten.nonzero.default"], syncs.breakdown()
    assert torch.equal(ids, all_ids[::2]) and torch.equal(grad, all_grad[::2])


def test_a_direct_lookup_checks_its_ids_with_one_host_read():
    """Ids from outside the layer are checked (test_out_of_range_ids_rejected), at the cost of one
    read of their smallest and largest together."""
    from tests.sync_ops import SyncCounter
    layer = make_layer()
    with SyncCounter() as syncs:
        layer.values.embedding_bag(torch.tensor([[0, 63]]), torch.ones(1, 2))
    assert [op for op, _ in syncs.events] == ["aten._unique2.default", ".tolist()"], syncs.breakdown()
