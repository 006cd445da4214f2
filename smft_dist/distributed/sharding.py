"""Swap the memory layers' value tables for row-sharded ones, and back (export).

Shape legend: N rows of the whole table, D value dim, R rows of this rank's shard, M mp ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.memory.values import LocalValueTable


def shard_memory(model, ctx, seed: Optional[int] = None) -> list:
    """Give every memory layer of `model` (an `SmftForCausalLM`) this rank's `ShardedValueTable`.

    seed=None: copy this rank's rows from the layer's current `LocalValueTable`; every rank must
    hold the same full table (same init seed, or loaded from the same checkpoint).
    seed=int: draw the shard directly, N(0, D^-1/2) with generator seed + layer position, equal to
    the rows of a `LocalValueTable.reset_parameters(generator)` with that seed.

    The table is attached with `register=False`, so it is not in `model.parameters()` /
    `state_dict()`: call this before handing the model to DeepSpeed / FSDP. Returns the tables in
    `model.memory_layers()` order.
    """
    tables = []
    for i, layer in enumerate(model.memory_layers()):
        old = layer.values
        if isinstance(old, ShardedValueTable):
            raise ValueError("the memory is already sharded: call unshard_memory(model) first")
        table = ShardedValueTable.from_context(old.num_rows, old.dim, ctx, dtype=old.weight.dtype)
        if seed is None:
            with torch.no_grad():
                table.weight.copy_(old.weight[table.row_start:table.row_end])
        else:
            table.reset_parameters(torch.Generator().manual_seed(seed + i))
        table.trainable = old.trainable
        layer.set_value_table(table, register=False)
        tables.append(table)
    return tables


def gather_full_table(table) -> torch.Tensor:
    """The whole N x D table on every rank of `table.group`. Collective, O(N) memory and bytes:
    for export and tests only, never in a training step."""
    w_RD = table.weight.detach()
    if getattr(table, "mp_size", 1) == 1:
        return w_RD.clone()
    sizes = table.plan.sizes()
    L = max(sizes)  # pad every shard to the largest: all_gather needs equal sizes
    pad_LD = w_RD.new_zeros(L, table.dim)
    pad_LD[:w_RD.shape[0]] = w_RD
    full_MLD = w_RD.new_empty(table.mp_size * L, table.dim)
    dist.all_gather_into_tensor(full_MLD, pad_LD, group=table.group)
    return torch.cat([full_MLD[r * L:r * L + n] for r, n in enumerate(sizes)])


def unshard_memory(model) -> None:
    """Put a full, registered `LocalValueTable` back in every sharded memory layer (for
    `save_pretrained` / export). Collective over each table's mp group."""
    for layer in model.memory_layers():
        table = layer.values
        if not isinstance(table, ShardedValueTable):
            continue
        full_ND = gather_full_table(table)
        local = LocalValueTable(table.num_rows, table.dim, dtype=full_ND.dtype, device=full_ND.device)
        with torch.no_grad():
            local.weight.copy_(full_ND)
        local.trainable = table.trainable
        layer.set_value_table(local, register=True)
