"""Product-key scoring is fp32 whatever the autocast (docs/performance.md "Scoring precision"), and
its top-K over pruned candidates equals the brute-force top-K over all n^2 slots."""
import pytest
import torch

from smft_dist.memory import ProductKeys, brute_force_topk


def near_tie_keys() -> tuple[ProductKeys, torch.Tensor]:
    """One head, n = 2 sub-keys per half, K = 2, half dim 1; the query projection is the identity,
    so the query (1, 1) is exact in bf16 and every difference below comes from the scoring alone.

    Half 0 sub-keys (1.0038, 1.0040), half 1 sub-keys (0.003, 0.0): in fp32 the slots (a, b) score
    1.0068, 1.0038, 1.0070, 1.0040, so the top 2 are slots 2 (1, 0) and 0 (0, 0). bf16 (spacing
    2^-7 near 1) rounds the half-0 scores to 1.0 and 1.0078 (1.0038 is below the midpoint 1.0039,
    1.0040 above it), so slots 2 and 3 score 1.0078 and slots 0 and 1 score 1.0 + 0.003 -> 1.0: bf16
    scoring keeps slots {2, 3}, fp32 scoring {2, 0}."""
    pk = ProductKeys(dim=2, n_keys=2, heads=1, knn=2, k_dim=2)
    with torch.no_grad():
        pk.query.weight.copy_(torch.eye(2))
        pk.query.bias.zero_()
        pk.keys.copy_(torch.tensor([[[[1.0038], [1.0040]], [[0.003], [0.0]]]]))
    return pk, torch.ones(3, 2)


def test_near_ties_pick_the_fp32_slots_under_bf16_autocast():
    pk, x = near_tie_keys()
    fp32_slots, fp32_scores = pk(x)
    assert fp32_slots.tolist() == [[[2, 0]]] * 3  # the construction above, in fp32
    # The batch discriminates: bf16 scoring (the keys and the sums rounded, as the scoring was
    # before it left autocast) keeps slot 3 instead of slot 0.
    s_2n = pk.keys.detach()[0, :, :, 0].to(torch.bfloat16)  # the half-scores: the sub-keys times the query's 1
    bf16_sums = (s_2n[0, :, None] + s_2n[1, None, :]).flatten()
    assert set(bf16_sums.topk(2).indices.tolist()) == {2, 3}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slots, scores = pk(x)
        ref_slots, _ = brute_force_topk(pk, x)
    assert scores.dtype == torch.float32
    assert torch.equal(slots, fp32_slots)
    assert torch.equal(ref_slots, fp32_slots)
    # Exactly the fp32 scores: the query (1, 1) is exact in bf16, the rest runs in fp32.
    assert torch.equal(scores, fp32_scores)


def row_sets(scores_THK, slots_THK) -> list:
    """Each (token, head)'s (score, slot) pairs, sorted: the top-K up to the order of equal scores."""
    return [sorted(zip(a, b)) for a, b in zip(scores_THK.flatten(0, 1).tolist(), slots_THK.flatten(0, 1).tolist())]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("knn", [1, 5, 16])
def test_pruned_candidates_give_the_brute_force_top_k(knn, qk_norm):
    """The top-K over the (a + 1)(b + 1) <= K candidates and the slot ids derived from the winners'
    ranks are the brute-force top-K of all n^2 slots (random fp32 scores: no ties), under bf16
    autocast too (the query in bf16 in both, the scores in fp32)."""
    torch.manual_seed(knn)
    pk = ProductKeys(dim=24, n_keys=32, heads=3, knn=knn, k_dim=16, qk_norm=qk_norm)
    x = torch.randn(64, 24)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            slots, scores = pk(x)
            ref_slots, ref_scores = brute_force_topk(pk, x)
        # the same two fp32 sub-scores added in the same order: bitwise equal
        assert torch.equal(scores, ref_scores)
        # Equal scores may come in either order (qk-norm gives exact fp32 ties): compare each row's
        # (score, slot) pairs as a set. These seeds have no tie at the K-th place.
        assert row_sets(scores, slots) == row_sets(ref_scores, ref_slots)
