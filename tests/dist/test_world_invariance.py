"""The same global batch trains the same update on 1 process and on 2 ranks, in every method, when
the ranks hold different numbers of label tokens; the logged loss is the global mean, also when a
rank holds no label token at all. With either memory exchange (dist.memory_exchange): rows, bitwise;
pooled (what the default `auto` picks at these shapes), within fp32 summation noise."""
import pytest
import torch

from smft_dist.config import load_config
from smft_dist.distributed import context_from_group, gather_full_table, init_distributed
from smft_dist.train.trainer import build_run
from tests.dist.helpers import run_ranks

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
# optim.eps=1e-4: AdamW moves a weight by lr * g / (|g| + eps), so a rounding difference dg moves it
# by at most lr * dg / eps; with the default 1e-8 a weight whose gradient cancels to ~0 turns fp32
# rounding into a sizeable part of lr. The update is still ~lr where |g| >> 1e-4 (most weights).
SMALL = ["model.memory_n_keys=16", "model.memory_knn=4", "model.memory_value_dim=32", "model.hidden_size=64",
         "model.num_attention_heads=4", "model.intermediate_size=32", "optim.warmup_steps=0", "optim.eps=1e-4",
         "optim.schedule=constant", "model.init_from=null", "logging.progress=false"]
METHODS = {
    "pretrain": ("pretrain.yaml", ["optim.lr=1e-2", "optim.memory_lr=1e-2"]),
    "full": ("finetune_full.yaml", ["optim.lr=1e-2", "optim.memory_lr=1e-2"]),  # its weight decay 0.1
    "lora": ("finetune_lora.yaml", ["optim.lr=1e-2", "lora.r=4"]),
    # per_token: the row gradient of the loss summed over the global batch's label tokens (SGD: linear in it)
    "sparse": ("finetune_sparse.yaml", ["selection.mode=tf", "selection.top_t=40", "optim.memory_lr=1.0",
                                        "optim.memory_lr_scale=per_token"]),
}
WORLD, ROWS_PER_RANK, SEQ, STEPS = 2, 2, 12, 3


def global_batch(step: int) -> dict:
    """4 rows; rank 0 holds rows 0-1 (every token a label: 22 label tokens), rank 1 rows 2-3 (3 label
    tokens each on steps 0-1, none on step 2: it still runs the forward and backward)."""
    x = torch.randint(3, 500, (WORLD * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(step))
    labels = x.clone()
    labels[ROWS_PER_RANK:, :SEQ - 3 if step < 2 else SEQ] = -100
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}


def rank_rows(batch: dict, rank: int, world: int) -> dict:
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def weights(tr, world: int) -> list[torch.Tensor]:
    """Every dense weight (sorted by name), then every memory table (whole, gathered over the shards)."""
    dense = tr.engine.dense_state_dict()
    memory = [gather_full_table(t) if world > 1 else t.weight.detach().clone() for t in tr.tables]
    return [dense[k].clone() for k in sorted(dense)] + memory


def train(rank: int, world: int, micro_batches: int = 1, exchange: str = "rows") -> dict:
    """-> {method: (weights before, weights after STEPS steps, the logged losses, the exchanges the
    memory tables' last lookups used)}. Each step, this rank's rows of the global batch, split into
    `micro_batches` micro-batches; `exchange`: dist.memory_exchange (world 1 has none)."""
    out = {}
    for method, (config, overrides) in METHODS.items():
        cfg = load_config(ROOT / "configs/tiny" / config, SMALL + overrides + [f"dist.memory_exchange={exchange}"])
        ctx = context_from_group(cfg.dist) if world > 1 else init_distributed(cfg.dist)
        tr = build_run(cfg, ctx)
        before, losses = weights(tr, world), []
        for s in range(STEPS):
            mine = rank_rows(global_batch(s), rank, world)
            losses.append(tr.train_step([rank_rows(mine, k, micro_batches) for k in range(micro_batches)])["loss"])
        out[method] = before, weights(tr, world), losses, {getattr(t, "last_exchange", None) for t in tr.tables}
    return out


@pytest.fixture(scope="module")
def one_batch():
    """1 process, the global batch as one micro-batch."""
    return train(0, 1)


@pytest.fixture(scope="module")
def one_process_two_micro_batches():
    """1 process, the global batch as 2 micro-batches: rank 0's rows, then rank 1's."""
    return train(0, 1, WORLD)


@pytest.fixture(scope="module")
def two_ranks():
    """2 ranks, the unique-row exchange: each token's bag sums its rows in the one-process order."""
    return run_ranks(train, WORLD, 1, "rows")[0]


@pytest.fixture(scope="module")
def two_ranks_pooled():
    """2 ranks, the pooled exchange: each owner sums its part of a token's bag, the token's rank
    adds the 2 partial sums."""
    return run_ranks(train, WORLD, 1, "pooled")[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_same_global_batch_same_update_on_1_and_2_ranks(one_batch, one_process_two_micro_batches, two_ranks,
                                                        method):
    init, ref, ref_losses, _ = one_batch[method]
    _, accumulated, accumulated_losses, _ = one_process_two_micro_batches[method]
    _, got, losses, exchanges = two_ranks[method]
    assert exchanges == {"rows"}, method
    # 2 ranks against 1 process running the same rows in the same forwards (the ranks' rows as its
    # 2 micro-batches): bitwise. Every kernel sees the same shapes; what differs is rank 1's gradient
    # joining rank 0's in an all-reduce instead of in .grad (a sum of 2 terms: commutative, exact)
    # and the x world in the weighting undone by the engines' / world (powers of 2: exact).
    assert all(torch.equal(g, a) for g, a in zip(got, accumulated)), method
    assert losses == accumulated_losses
    # Against the global batch in one forward: other fp32 kernel blockings (4 rows, not 2 + 2) give
    # gradient differences of ~1e-7 relative (|dg| < 1e-8 here), which move an AdamW weight by at most
    # lr * dg / eps = 1e-4 lr per step (1e-6 relative for the SGD rows); over 3 steps, with the
    # forwards on those weights, well under 1e-3 of the largest update. Weighting each rank's mean
    # loss equally (a mean of means) moves these weights by 0.7-2x the largest update.
    update = max((r - i).abs().max().item() for r, i in zip(ref, init))
    assert update > 1e-2, f"{method}: nothing trained"
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-3 * update, msg=method)
    # The logged loss is the mean over the global batch's label tokens, also on the step where rank 1
    # has none (finite: the NaN mean over its no tokens weighs nothing).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


# Pooled against the same rows in 1 process, per tensor, relative to that tensor's own update
# (after - before): the pooled bag adds each token's 2 per-owner partial sums, the 1-process bag sums
# its H x knn = 16 weighted rows in one order. Re-associating an fp32 sum of 16 terms changes it by at
# most 15 x 2^-24 ~ 1e-6 of the sum of the terms' magnitudes, and the forward and backward carry that
# linearly: each gradient element moves by |dg| <~ 1e-6 |g|max of its tensor. AdamW moves a weight by
# lr m^ / (sqrt(v^) + eps), so dg moves it by at most lr |dg| / eps per step (eps = 1e-4: SMALL), while
# the tensor's largest update is at least lr |g|max / (|g|max + eps) (its first step): per step at most
# 1e-6 (|g|max + eps) / eps = 1e-6 (1 + |g|max / 1e-4) of the update, <= 1e-4 for the mean-loss
# gradients here (|g|max <~ 1e-2: a 64-wide model, the mean over 22-28 label tokens). The forwards
# on weights this close add a second-order term. Over 3 steps: 3e-4; the bound 1e-3 (measured: at
# most 4e-5). SGD (sparse) moves by lr dg: 1e-6 per step.
# Frozen tensors have no update: bound 0, bitwise.
POOLED_RTOL = 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_pooled_exchange_same_update_within_summation_noise(one_process_two_micro_batches, two_ranks_pooled,
                                                             method):
    init, accumulated, accumulated_losses, _ = one_process_two_micro_batches[method]
    _, got, losses, exchanges = two_ranks_pooled[method]
    assert exchanges == {"pooled"}, method
    assert any((a - i).abs().max() > 1e-3 for i, a in zip(init, accumulated)), f"{method}: nothing trained"
    for k, (i, g, a) in enumerate(zip(init, got, accumulated)):
        update = (a - i).abs().max().item()
        torch.testing.assert_close(g, a, rtol=0, atol=POOLED_RTOL * update, msg=f"{method}: tensor {k}")
    # The logged losses: the same batch through weights within the bound above of each other and bags
    # within 1e-6 relative: a few 1e-7 relative (measured: at most 1.5e-7), bound 1e-5 as above.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(accumulated_losses), rtol=1e-5, atol=0)
