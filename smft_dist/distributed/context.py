"""Process groups for ``world = dp_replicate x mp`` (docs/design.md §2.1).

The world is laid out as `dp_replicate` blocks of `mp` consecutive ranks. Ranks of one block hold
one copy of the whole memory table, row-sharded (the *mp group*, where the sparse all-to-all runs);
ranks at the same position of different blocks hold the same shard (the *replicate group*, where
replicas combine their row-sparse gradients). World 4 = dp_replicate 2 x mp 2::

    mp groups:        [0, 1]  [2, 3]        (contiguous: the all-to-all stays within a node)
    replicate groups: [0, 2]  [1, 3]        (strided)

The dense model is data parallel over the whole world (DeepSpeed / FSDP use the default group).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from smft_dist.config import ConfigError, DistConfig


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None: single process without a process group
    mp_size: int
    mp_rank: int
    dp_replicate: int
    mp_group: Optional[dist.ProcessGroup]  # None only without a process group
    replicate_group: Optional[dist.ProcessGroup]  # None when dp_replicate == 1
    memory_exchange: str = "auto"  # dist.memory_exchange: how sharded lookups cross ranks

    @property
    def replicate_rank(self) -> int:
        """Which copy of the table this rank belongs to (index of its mp block)."""
        return self.rank // self.mp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """-> (rank, world_size, local_rank) from torchrun / the deepspeed launcher (RANK, WORLD_SIZE,
    LOCAL_RANK) or, failing that, Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0)
    without either."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _slurm_master_addr() -> str:
    """The first host of the Slurm allocation: every task agrees on it without communicating."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _resolve_device_backend(cfg: DistConfig, local_rank: int) -> tuple[torch.device, str]:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda but no CUDA device is visible: use dist.device=auto or cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if want_cuda else "gloo")
    if backend == "nccl" and not want_cuda:
        raise ConfigError("dist.backend=nccl needs CUDA tensors: set dist.device=cuda (or backend=gloo/auto)")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


def _sizes(cfg: DistConfig, world_size: int) -> tuple[int, int]:
    """-> (dp_replicate, mp), checked: their product must be the world size."""
    if cfg.dp_replicate < 1 or cfg.mp < 0:
        raise ConfigError(f"dist.dp_replicate={cfg.dp_replicate} must be >= 1 and dist.mp={cfg.mp} >= 0")
    mp = cfg.mp or max(world_size // cfg.dp_replicate, 1)
    if cfg.dp_replicate * mp != world_size:
        raise ConfigError(
            f"dp_replicate {cfg.dp_replicate} x mp {mp} = {cfg.dp_replicate * mp} != world {world_size}: "
            "set dist.mp=0 (derived) or sizes whose product is the world size"
        )
    return cfg.dp_replicate, mp


def _build_groups(rank: int, world_size: int, dp_replicate: int, mp: int, timeout: timedelta):
    """Every rank must create every group, in the same order (torch.distributed.new_group rule).
    `timeout` is passed on explicitly: a subgroup otherwise gets the backend's default (30 min),
    not the world's, and a dead peer would hang its collectives that long."""
    mp_group = replicate_group = None
    if mp == world_size:
        mp_group = dist.group.WORLD
    else:
        for b in range(dp_replicate):
            g = dist.new_group(list(range(b * mp, (b + 1) * mp)), timeout=timeout)
            if rank // mp == b:
                mp_group = g
    if dp_replicate > 1:
        if dp_replicate == world_size:
            replicate_group = dist.group.WORLD
        else:
            for j in range(mp):
                g = dist.new_group(list(range(j, world_size, mp)), timeout=timeout)
                if rank % mp == j:
                    replicate_group = g
    return mp_group, replicate_group


def context_from_group(cfg: Optional[DistConfig] = None, device: Optional[torch.device] = None) -> DistContext:
    """A `DistContext` over the existing default process group (tests under `run_ranks`, or after
    `deepspeed.init_distributed`). Creates the mp / replicate subgroups: collective."""
    if not dist.is_initialized():
        raise RuntimeError("context_from_group needs an initialised process group: call init_distributed instead")
    cfg = cfg or DistConfig()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = launcher_env()[2]
    backend = dist.get_backend()
    if device is None:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    dp_replicate, mp = _sizes(cfg, world)
    mp_group, replicate_group = _build_groups(rank, world, dp_replicate, mp, timedelta(seconds=cfg.timeout_s))
    return DistContext(rank, world, local_rank, device, backend, mp, rank % mp, dp_replicate, mp_group,
                       replicate_group, cfg.memory_exchange)


def init_distributed(cfg: Optional[DistConfig] = None) -> DistContext:
    """Join (or reuse) the default process group from the launcher's environment and build the
    mp / replicate groups. A single process gets world 1 and no group, except under
    dist.engine=deepspeed, whose `initialize` needs a process group at any world size: it gets a
    world-1 group over an in-process store (no rendezvous, no port)."""
    cfg = cfg or DistConfig()
    rank, world, local_rank = launcher_env()
    device, backend = _resolve_device_backend(cfg, local_rank)
    if dist.is_initialized():  # e.g. deepspeed.init_distributed already ran: reuse its group
        return context_from_group(cfg, device)
    if world == 1:
        _sizes(cfg, 1)
        if cfg.engine != "deepspeed":
            return DistContext(0, 1, local_rank, device, None, 1, 0, 1, None, None)
        # What a launcher sets (DeepSpeed reads its device from LOCAL_RANK, streaming all four).
        for key, value in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", 1)):
            os.environ.setdefault(key, str(value))
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=cfg.timeout_s))
        return context_from_group(cfg, device)
    _sizes(cfg, world)  # fail before the rendezvous, with the arithmetic in the message
    os.environ.setdefault("MASTER_ADDR", _slurm_master_addr() if "SLURM_PROCID" in os.environ else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.timeout_s))
    return context_from_group(cfg, device)
