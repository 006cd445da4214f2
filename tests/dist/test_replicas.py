"""check_replicas: identical memory replicas pass, one flipped bit on one replica fails every rank."""
import torch

from smft_dist.config import DistConfig
from smft_dist.distributed import context_from_group
from smft_dist.distributed.replicas import ReplicaDivergenceError, check_replicas
from smft_dist.memory import ShardedValueTable
from tests.dist.helpers import run_ranks


def _replicas(rank, world_size, corrupt_rank):
    """World 4 = dp_replicate 2 x mp 2; every replica of shard j starts from the same rows."""
    ctx = context_from_group(DistConfig(dp_replicate=2, mp=2))
    table = ShardedValueTable.from_context(64, 8, ctx)
    torch.manual_seed(ctx.mp_rank)  # the same seed on both replicas of a shard
    with torch.no_grad():
        table.weight.normal_()
        if rank == corrupt_rank:
            bits = table.weight.view(torch.int32)
            bits[3, 5] ^= 1  # the lowest mantissa bit of one element
    try:
        return check_replicas([table], ctx)
    except ReplicaDivergenceError as e:
        return f"error: {e}"


def test_identical_replicas_pass_and_a_flipped_bit_fails_everywhere():
    ok = run_ranks(_replicas, 4, -1)
    assert ok[0] == ok[2] and ok[1] == ok[3] and ok[0] != ok[1]  # digests: same shard, same bytes
    bad = run_ranks(_replicas, 4, 3)
    assert all(r.startswith("error: memory replicas differ") for r in bad), bad
    assert "replicas [1] of shard 1" in bad[1] and "another shard's replicas" in bad[0]
