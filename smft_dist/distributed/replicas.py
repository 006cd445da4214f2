"""Check that the replicas of the memory table (dist.dp_replicate > 1) hold the same rows, bit for bit.

Replicas stay identical by construction: every replica applies the same summed row-sparse update
(`ShardedValueTable.sync_replicas`). A divergence (a replica skipping a step, a non-deterministic
reduction) would silently split the model into `dp_replicate` different models, of which only
replica 0 is saved. One SHA-256 of each shard, compared over its replicate group, finds it at the
cost of one read of the shard and an all-gather of 32 bytes.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


class ReplicaDivergenceError(RuntimeError):
    """The replicas of a memory shard hold different rows."""


def shard_digest(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """SHA-256 of a shard's bytes (any dtype, any device) -> (32,) uint8 on `device`, where the
    collectives run (the table's compute device: an offloaded shard lives on the host)."""
    data = weight.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8, device=device)


def check_replicas(tables, ctx) -> str:
    """Compare every table's shard with the same shard on the other replicas. Collective over the
    world (every rank must call it). -> the digests of this rank's shards (hex, `,`-joined);
    raises ReplicaDivergenceError on every rank if any replica differs anywhere."""
    if ctx.replicate_group is None or not tables:
        return ""
    mine = torch.stack([shard_digest(t.weight, t.compute_device) for t in tables])  # T x 32
    replicas = dist.get_world_size(ctx.replicate_group)
    gathered = mine.new_empty(replicas * mine.numel())  # flat: gloo gathers along dim 0 only
    dist.all_gather_into_tensor(gathered, mine.flatten(), group=ctx.replicate_group)
    gathered = gathered.view(replicas, *mine.shape)
    differ = (gathered != gathered[0]).flatten(1).any(dim=1)  # per replica
    flag = torch.tensor([int(differ.any())], device=mine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank raises, not only a diverged group's
    if flag.item():
        where = f"replicas {differ.nonzero().flatten().tolist()} of shard {ctx.mp_rank}" if differ.any() else \
            "another shard's replicas"
        raise ReplicaDivergenceError(f"memory replicas differ ({where} vs replica 0): dp_replicate copies of the "
                                     f"table must apply identical updates")
    return ",".join(bytes(d.tolist()).hex()[:16] for d in mine.cpu())
