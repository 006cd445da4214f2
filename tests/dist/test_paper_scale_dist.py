"""The paper-scale paths on 2 ranks: activation checkpointing and gradient accumulation with a
row-sharded table, and one fact per global step when the 2 ranks are 2 nodes."""
import os

import numpy as np
import torch

from smft_dist.distributed import gather_full_table
from tests.dist.helpers import run_ranks
from tests.test_paper_scale import SPARSE, assert_same_step, batch, one_sparse_step, rows, trainer


def _sharded(rank, world):
    """-> (activation checkpointing off/on: one sparse step each; the table after 2 accumulated steps)."""
    b = rows(batch(0, n=4, pad_last=5), 2 * rank, 2 * rank + 2)  # rank 1's last row is padded
    steps = one_sparse_step(False, b), one_sparse_step(True, b)
    tr = trainer(*SPARSE, "data.batch_size=2", "optim.grad_accum=2")
    for s in range(2):  # 2 ranks x 2 micro-batches of 2 rows
        b = rows(batch(s, n=8), 4 * rank, 4 * rank + 4)
        tr.train_step([rows(b, 0, 2), rows(b, 2, 4)])
    return steps, gather_full_table(tr.tables[0])


def test_checkpointing_and_accumulation_on_a_sharded_table():
    results = run_ranks(_sharded, 2)
    for (plain, ckpt), _ in results:
        assert_same_step(plain, ckpt)  # per rank: its shard's counts and row grads, the global selection
    # Accumulation: the selection covers all 8 rows of the 2 ranks' 2 micro-batches; one update a step.
    ref = trainer(*SPARSE, "data.batch_size=8")
    before = ref.tables[0].weight.clone()
    for s in range(2):
        ref.train_step(batch(s, n=8))
    got = results[0][1]
    changed = lambda w: (w != before).any(1).nonzero().squeeze(1)  # noqa: E731
    assert torch.equal(changed(got), changed(ref.tables[0].weight)) and changed(got).numel() > 12
    torch.testing.assert_close(got, ref.tables[0].weight, rtol=1e-4, atol=1e-6)


# ----- one fact per global step on 2 nodes -----
def _as_two_nodes(rank, world, path):
    """Rank r is node r (LOCAL_WORLD_SIZE=1). Both 'nodes' share this host's /dev/shm, where
    streaming's node leaders would register the same prefix at the same moment: rank 1 takes the
    next free one, as it would find it free on a node of its own."""
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import smft_dist.data.loader as loader_mod
    from smft_dist.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.shared import prefix

    loader_mod.LOCK_PATH = loader_mod.LOCK_PATH.with_name(f"{loader_mod.LOCK_PATH.name}.node{rank}")
    if rank == 1:
        first_free = prefix._check_and_find_retrying

        def next_free(*args, **kwargs):
            p = first_free(*args, **kwargs) + 1
            while os.path.exists(f"/dev/shm/{p:06}_locals"):
                p += 1
            return p

        prefix._check_and_find_retrying = next_free
    loader = loader_mod.build_dataloader(path, 4, shuffle=False, seed=0, rank=rank, world_size=world)
    loader_mod.check_one_group_per_batch(loader.dataset, 4, world, 1)
    return [b["group"].tolist() for b in loader]


def test_unshuffled_grouped_set_gives_one_fact_per_global_step_on_two_nodes(tmp_path):
    from smft_dist.data.mds import write_mds

    samples = [{"input_ids": np.arange(8, dtype=np.int32) + i, "attention_mask": np.ones(8, np.uint8),
                "loss_mask": np.ones(8, np.uint8), "group": i // 8} for i in range(64)]
    write_mds(tmp_path, samples, grouped=True)
    per_rank = run_ranks(_as_two_nodes, 2, str(tmp_path))
    steps = list(zip(*per_rank))
    assert len(steps) == 8
    for s, (a, b) in enumerate(steps):
        assert set(a) | set(b) == {s}, f"global step {s} holds facts {set(a) | set(b)}"
