"""Process groups for world = dp_replicate x mp, the launcher env, and the row partition."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from smft_dist.config import ConfigError, DistConfig
from smft_dist.distributed import context_from_group, init_distributed, launcher_env
from smft_dist.memory import RowShardPlan
from tests.dist.helpers import free_port, run_ranks


# ----- RowShardPlan -----
def test_plan_worked_examples():
    plan = RowShardPlan(7, 2)
    assert [plan.bounds(r) for r in range(2)] == [(0, 4), (4, 7)]
    assert plan.owner_of(torch.tensor([6, 0, 3, 4])).tolist() == [1, 0, 0, 1]
    assert [RowShardPlan(49, 3).bounds(r) for r in range(3)] == [(0, 17), (17, 33), (33, 49)]


@pytest.mark.parametrize("rows,mp", [(1, 1), (5, 4), (49, 3), (64, 2), (1000, 7), (7, 7)])
def test_plan_owner_matches_bounds(rows, mp):
    plan = RowShardPlan(rows, mp)
    expect = torch.cat([torch.full((hi - lo,), r) for r in range(mp) for lo, hi in [plan.bounds(r)]])
    assert torch.equal(plan.owner_of(torch.arange(rows)), expect)
    assert max(plan.sizes()) - min(plan.sizes()) <= 1 and sum(plan.sizes()) == rows


def test_plan_rejects_more_ranks_than_rows():
    with pytest.raises(ValueError, match="memory_n_keys"):
        RowShardPlan(3, 4)


# ----- launcher environment -----
def test_launcher_env_torchrun_then_slurm():
    assert launcher_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert launcher_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    both = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}
    assert launcher_env(both) == (0, 2, 0)  # torchrun inside an allocation: its env wins
    assert launcher_env({}) == (0, 1, 0)


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(DistConfig(device="cpu"))
    assert (ctx.rank, ctx.world_size, ctx.mp_size, ctx.mp_group, ctx.backend) == (0, 1, 1, None, None)
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=r"dp_replicate 2 x mp 1 = 2 != world 1"):
        init_distributed(DistConfig(dp_replicate=2, device="cpu"))


# ----- groups on real ranks -----
def _groups_body(rank, world, port):
    ctx = context_from_group(DistConfig(mp=2, dp_replicate=2))
    assert dist.get_process_group_ranks(ctx.mp_group) == ([0, 1] if rank < 2 else [2, 3])
    assert dist.get_process_group_ranks(ctx.replicate_group) == [rank % 2, rank % 2 + 2]
    assert (ctx.mp_rank, ctx.replicate_rank) == (rank % 2, rank // 2)
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=ctx.mp_group)
    assert x.item() == (1.0 if rank < 2 else 5.0)
    with pytest.raises(ConfigError, match=r"dp_replicate 2 x mp 3 = 6 != world 4"):
        context_from_group(DistConfig(mp=3, dp_replicate=2))

    # A fresh rendezvous from the launcher env (what torchrun / deepspeed / srun set).
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    ctx = init_distributed(DistConfig(mp=0, dp_replicate=2, device="cpu"))
    assert (ctx.world_size, ctx.mp_size, ctx.dp_replicate, ctx.backend) == (4, 2, 2, "gloo")
    assert dist.get_process_group_ranks(ctx.replicate_group) == [rank % 2, rank % 2 + 2]


def test_groups_world4_dp2_mp2():
    run_ranks(_groups_body, 4, free_port())
