"""Replicas of a shard (dp_replicate = 3, two micro-batches: the case where the order of a float sum
shows) hold the same row-gradient entries in the same order after `sync_replicas`, so a sum whose
order is fixed by the entries' order (`RowSparse.coalesce`, tests/test_deterministic_coalesce.py)
gives every replica the same bits, on real gloo ranks."""
import torch

from smft_dist.config import DistConfig
from smft_dist.distributed import context_from_group
from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.memory.values import sum_by_id
from tests.dist.helpers import run_ranks

REPLICAS = 3


def _replica_body(rank, world):
    table = ShardedValueTable.from_context(8, 2, context_from_group(DistConfig(mp=1, dp_replicate=world)))
    ids_U = torch.tensor([1, 5])
    # fp32 sums of these depend on their order: 1e8 + 1 rounds to 1e8 (the fp32 spacing there is 8)
    big_per_micro = ([1e8, 1.0, 1.0][rank], [-1e8, 1.0, 1.0][rank])
    for big in big_per_micro:  # each micro-batch's backward, then the sync (grad_accum 2)
        table.push_grad(ids_U, torch.tensor([[big, 1.0], [1.0, big]]))
        table.sync_replicas()
    entries = [(ids.clone(), vals.clone()) for ids, vals in zip(table._grad._ids, table._grad._vals)]
    return entries, table.sparse_grad()


def test_replicas_sum_the_same_entries_in_the_same_order():
    results = run_ranks(_replica_body, REPLICAS)
    entries, (ids, grad) = results[0]
    for other_entries, (other_ids, other_grad) in results[1:]:
        assert len(other_entries) == len(entries)
        assert all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(entries, other_entries))
        assert torch.equal(other_ids, ids) and torch.equal(other_grad, grad)
    # the order matters for these rows: in this order ((((1e8 + 1) + 1) - 1e8) + 1) + 1 = 2 (exact),
    # with the last entry first 1
    all_ids, all_vals = torch.cat([e[0] for e in entries]), torch.cat([e[1] for e in entries])
    assert torch.equal(grad, torch.tensor([[2.0, 6.0], [6.0, 2.0]]))
    assert not torch.equal(sum_by_id(all_ids.roll(1), all_vals.roll(1, 0))[1], grad)


def _offloaded_replica_body(rank, world):
    """A step of 2 micro-batches, then the one `sync_replicas` the trainer makes after backward,
    on a resident and on an offloaded table: -> (their summed gradients, the offloaded one's host
    sum buffer)."""
    out = []
    for offload in ("none", "host"):
        table = ShardedValueTable.from_context(8, 2, context_from_group(DistConfig(mp=1, dp_replicate=world)))
        if offload == "host":
            table.offload_to_host()
        table.zero_step()
        table.set_grad_scale(0.5)
        big_per_micro = ([1e8, 1.0, 1.0][rank], [-1e8, 1.0, 1.0][rank])
        for big in big_per_micro:
            table.push_grad(torch.tensor([1, 5]), torch.tensor([[big, 1.0], [1.0, big]]))
        table.sync_replicas()
        out.append(table.sparse_grad())
    return out


def test_an_offloaded_shards_replicas_sum_like_resident_ones():
    """Offloaded, each replica's step lands in its host sum; the sync sends each replica's sum and
    adds the gathered ones back in replica order, as a resident table adds the same entries: every
    replica, offloaded or not, ends with the same bits. On the diagonal rank 0's own sum is
    0.5e8 - 0.5e8 = 0 and the others' 0.5 + 0.5 = 1: 2 in replica order; off it, 3 x 1."""
    results = run_ranks(_offloaded_replica_body, REPLICAS)
    (ids, grad), _ = results[0]
    assert torch.equal(ids, torch.tensor([1, 5])) and torch.equal(grad, torch.tensor([[2.0, 3.0], [3.0, 2.0]]))
    for resident, host in results:
        assert torch.equal(resident[0], ids) and torch.equal(resident[1], grad)
        assert torch.equal(host[0], ids) and torch.equal(host[1], grad)
