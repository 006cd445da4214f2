"""The background document frequency df(i) of every memory slot (docs/design.md §1.2, §2.4).

Shape legend: R rows of this shard, R' rows touched in a batch, N rows in the whole table.

df(i) = number of background batches (|B| of them, from the pretraining corpus) in which slot i is
accessed at least once, counted over the global batch. It is an int32 per row, sharded like the
values; built once by a forward-only pass, then stored with the checkpoint. The file always holds
the full N-long vector (4 bytes per slot: 4 MB for 1M slots), so it loads at any shard layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smft_dist.memory.values import ValueTable, counting_accesses
from smft_dist.selection.counts import sync_replica_counts, table_group


@dataclass
class BackgroundIndex:
    """df_R (int32) of rows [row_start, row_end) of a table with `num_slots` rows, built from
    `num_batches` background batches of `corpus`."""

    df: torch.Tensor
    num_batches: int
    num_slots: int
    row_start: int
    row_end: int
    corpus: str = ""
    group: Optional[dist.ProcessGroup] = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, table: ValueTable, corpus: str = "") -> "BackgroundIndex":
        df = torch.zeros(table.row_end - table.row_start, dtype=torch.int32, device=table.compute_device)
        return cls(df, 0, table.num_rows, table.row_start, table.row_end, corpus, table_group(table))

    def add_batch(self, table: ValueTable) -> None:
        """Count one background batch from the table's access counts: O(rows touched)."""
        sync_replica_counts(table)
        ids_R, counts_R = table.access_counts()  # local ids, global counts
        self.df[ids_R[counts_R > 0]] += 1
        self.num_batches += 1

    def lookup(self, global_ids: torch.Tensor) -> torch.Tensor:
        """-> df of these global ids (all owned by this shard)."""
        return self.df[global_ids - self.row_start]

    def full(self) -> torch.Tensor:
        """-> df_N of the whole table on every rank of the group (collective; save time only).
        Rows are disjoint across ranks, so a sum of zero-padded shards assembles the vector;
        int32 because NCCL and gloo both reduce it."""
        if self.group is None and (self.row_start, self.row_end) == (0, self.num_slots):
            return self.df
        full = torch.zeros(self.num_slots, dtype=torch.int32, device=self.df.device)
        full[self.row_start:self.row_end] = self.df
        if self.group is not None:
            dist.all_reduce(full, group=self.group)
        return full

    def save(self, path: str | os.PathLike) -> None:
        """Write the full df (safetensors). Collective: every rank calls it; global rank 0 writes."""
        full = self.full().cpu().contiguous()
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            meta = {"num_batches": str(self.num_batches), "num_slots": str(self.num_slots),
                    "row_start": "0", "row_end": str(self.num_slots), "corpus": self.corpus}
            save_file({"df": full}, str(path), metadata=meta)
        if dist.is_initialized():
            dist.barrier()  # the file exists for every rank once save returns

    @classmethod
    def load(cls, path: str | os.PathLike, table: ValueTable) -> "BackgroundIndex":
        """Read the rows of `table`'s shard from a saved df (any shard layout it was saved from)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no df index at {path}: build it with mode=background_index "
                                    "(or point selection.df_path at it)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                n = int(meta.get("num_slots", -1))
                if n != table.num_rows:
                    raise ValueError(f"df index {path} built for {n} slots, model has {table.num_rows}: "
                                     "rebuild it with mode=background_index")
                df = f.get_slice("df")[table.row_start:table.row_end]
        except SafetensorError as e:  # truncated, emptied or not a safetensors file: a ValueError like the above
            raise ValueError(f"df index {path} is unreadable ({e}): rebuild it with mode=background_index") from None
        return cls(df.to(device=table.compute_device, dtype=torch.int32), int(meta["num_batches"]), n,
                   table.row_start, table.row_end, meta.get("corpus", ""), table_group(table))


def _forward(model, batch) -> None:
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):
        model(input_ids=batch.to(device))
        return
    mask = batch.get("attention_mask")
    model(input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device))


@torch.no_grad()
def build_background_index(model, batches: Iterable, num_batches: int, tables: Optional[Sequence[ValueTable]] = None,
                           corpus: str = "", micro_batches: int = 1) -> list[BackgroundIndex]:
    """Forward-only pass over `num_batches` background batches -> one `BackgroundIndex` per table.

    `batches` yields this rank's slice of each global batch (input_ids tensors or dicts with
    `input_ids` and optional `attention_mask`); padding makes no accesses. Under a sharded table
    every rank must run the same number of batches (the lookups are collective). `tables` defaults
    to the value tables of `model.memory_layers()`. `micro_batches` (optim.grad_accum): that many
    yielded batches make one background batch, as they make one finetuning step's batch.
    """
    if num_batches < 1:
        raise ValueError(f"selection.background_batches={num_batches} must be >= 1")
    tables = list(tables) if tables is not None else [layer.values for layer in model.memory_layers()]
    indexes = [BackgroundIndex.empty(t, corpus) for t in tables]
    was_training = model.training
    model.eval()
    it = iter(batches)
    try:
        with counting_accesses(tables):  # a no-grad pass whose accesses are the point
            for b in range(num_batches):
                for t in tables:
                    t.zero_step()
                for _ in range(micro_batches):
                    batch = next(it, None)
                    if batch is None:
                        raise ValueError(f"the background data ran out after {b} batches, "
                                         f"selection.background_batches={num_batches}: lower it or use more data")
                    _forward(model, batch)
                for index, t in zip(indexes, tables):
                    index.add_batch(t)
    finally:
        for t in tables:
            t.zero_step()
        model.train(was_training)
    return indexes
