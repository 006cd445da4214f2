"""Per-step access counts c(i) of a value table's rows (docs/design.md §1.2, §2.4).

Shape legend: R' rows of this shard touched this step.

The sharded lookup routes every access to the row's owner, so the owner of row i holds the count
of i over its memory-parallel group's tokens. With replicas (dp_replicate > 1) each copy of the
table saw only its own block of ranks: `sync_replica_counts` sums the counts over the replicas
first. After that only scalars (sum_j c(j), number of touched rows) need a collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from smft_dist.memory.values import ValueTable


def table_group(table: ValueTable) -> Optional[dist.ProcessGroup]:
    """The table's memory-parallel group (None: the whole table is local, no collectives)."""
    return getattr(table, "group", None)


def sync_replica_counts(table: ValueTable) -> None:
    """Sum this step's counts over the table's replicas (no-op without replicas). Call once per
    step, after the forward, before reading the counts: there is no gradient yet, so the table's
    `sync_replicas` moves only counts. (Its later call after backward sums the gradients; that it
    sums the counts again then does not matter: the selection is made. Not idempotent: a second
    call before that would double the counts.)"""
    if getattr(table, "replicate_group", None) is not None:
        table.sync_replicas()


def local_counts(table: ValueTable) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (global ids_R' sorted int64, counts_R' int64 > 0) of this shard's rows touched this step.
    Every recorded count is >= 1 (lookups record only the ids they fetch), so all are candidates."""
    ids, counts = table.access_counts()
    return ids + table.row_start, counts


def all_reduce_sum(values: list[int], group: Optional[dist.ProcessGroup], device=None) -> list[int]:
    """Sum a few integers over `group` in one collective (identity when group is None)."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def all_reduce_sum_tensor(values_X: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """values_X summed over `group` on the device, not read by the host (identity when group is None)."""
    if group is not None:
        dist.all_reduce(values_X, op=dist.ReduceOp.SUM, group=group)
    return values_X


def all_reduce_max(value: int, group: Optional[dist.ProcessGroup], device=None) -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate equal-size tensors of every group rank along dim 0 (one collective).
    `all_gather_single` where this torch has it (2.13 deprecates all_gather_into_tensor)."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x.contiguous(), group=group)
    return out


def global_total(counts: torch.Tensor, group: Optional[dist.ProcessGroup]) -> int:
    """sum_j c(j) over the whole table: the local sum, all-reduced over the memory-parallel group.

    The same for every slot in a step, so it changes no ranking; it gives exact score values."""
    return all_reduce_sum([int(counts.sum())], group, counts.device)[0]
