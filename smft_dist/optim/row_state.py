"""Optimizer state for the rows of one value-table shard that have been updated.

Shape legend: R rows of this shard, S rows holding state, U rows updated this step, N of them new.

Two layouts, one interface (`claim`, `slots`, `state[name]`, `state_dict`, `load_state_dict`):

- `RowState`, sparse memory finetuning: a few hundred rows per step out of millions are ever
  updated, so state is kept only for them: a growing buffer per state tensor (capacity doubles, so
  appending U rows is amortised O(U x D), but stops at the shard's R rows: `capacity_for`), the
  int64 row of each slot and an int32 row -> slot map. The map costs 4 bytes per row of the shard
  (not R x D): it makes lookups and inserts O(U), where a sorted id index would re-sort all S ids
  every step.
- `DenseRowState`, pretraining and full finetuning of values: every row the batch touches is
  updated, so over a run every row of the shard has state. It is allocated for all R rows once,
  zero, and indexed by local row: no slot map, no row ids, and no growth (whose old copy of the
  largest buffer was as large as that buffer: 68.7 GB per GPU at 134M slots on 8 GPUs).

Both save the same state dict (the global ids of the rows with state, and their state), so a
checkpoint written by either loads into either, at any shard layout.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from smft_dist.memory.values import ValueTable

MIN_CAPACITY = 64  # slots of the first allocation


def capacity_for(rows_in_use: int, shard_rows: int) -> int:
    """Slots `RowState` holds once `rows_in_use` rows have state: the smallest 64 x 2^k that fits
    them (so appends are amortised O(1) per row), but never more than the shard's rows (each row
    has one slot at most)."""
    cap = MIN_CAPACITY
    while cap < rows_in_use:
        cap *= 2
    return min(cap, shard_rows)


class RowState:
    """Named per-row state tensors of shape (S, *trailing), zero-initialised on first use."""

    def __init__(self, table: ValueTable, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.row_start, self.num_local = table.row_start, table.row_end - table.row_start
        self.device, self.specs = table.weight.device, specs
        self._slot_R = None  # int32 local row -> slot, -1 = no state (allocated on first use)
        self._rows_S = torch.empty(0, dtype=torch.long, device=self.device)  # local row of each slot
        self._bufs = {k: torch.zeros((0, *shape), dtype=dt, device=self.device) for k, (shape, dt) in specs.items()}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._bufs[name][: self.size]

    def slots(self, rows_U: torch.Tensor) -> torch.Tensor:
        """-> slots_U (int64) of these unique local rows, allocating zero state for new ones."""
        return self.claim(rows_U)[0]

    def claim(self, rows_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (slots_U, new_N): the slots of these unique local rows, allocating zero state for the
        rows without state, and the positions in rows_U of those rows (appended in the order given)."""
        if self._slot_R is None:
            self._slot_R = torch.full((self.num_local,), -1, dtype=torch.int32, device=self.device)
        slots_U = self._slot_R[rows_U].long()
        new_N = (slots_U < 0).nonzero().squeeze(1)  # the one read: how many rows are new
        n_new = new_N.numel()
        if n_new:
            self._reserve(self.size + n_new)
            fresh = torch.arange(self.size, self.size + n_new, device=self.device)
            rows_N = rows_U[new_N]
            self._slot_R[rows_N] = fresh.int()
            self._rows_S[fresh] = rows_N
            slots_U[new_N] = fresh
            self.size += n_new
        return slots_U, new_N

    def _reserve(self, n: int) -> None:
        """Room for n rows with state, at `capacity_for(n, R)` slots. Grows one buffer at a time
        (allocate, copy, drop the old one), the row ids first and then the state by increasing row
        size: while growing, the memory held is the new capacity plus at most the largest old buffer."""
        if n <= self._rows_S.shape[0]:
            return
        cap = capacity_for(n, self.num_local)
        self._rows_S = self._grown(self._rows_S, cap)
        for name in sorted(self._bufs, key=lambda k: math.prod(self.specs[k][0]) * self.specs[k][1].itemsize):
            self._bufs[name] = self._grown(self._bufs[name], cap)

    @staticmethod
    def _grown(buf_S: torch.Tensor, cap: int) -> torch.Tensor:
        """-> buf_S copied into a new (cap, ...) buffer, zero beyond its rows (the one allocation
        of a growth: the caller drops buf_S right after)."""
        out = buf_S.new_empty((cap, *buf_S.shape[1:]))
        out[: buf_S.shape[0]] = buf_S
        out[buf_S.shape[0]:].zero_()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"ids": global row ids_S, name: state_S...}: keyed by global id so it can be resharded."""
        out = {"ids": self._rows_S[: self.size] + self.row_start}
        out.update({k: self[k].clone() for k in self._bufs})
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the rows of this shard from a state dict of any shard layout (e.g. the
        concatenation of every rank's `state_dict()`); rows owned elsewhere are ignored."""
        missing = set(self.specs) - set(sd)
        if missing:
            raise KeyError(f"optimizer row state lacks {sorted(missing)}: was it saved by another optimizer?")
        ids = sd["ids"].long() - self.row_start
        mine = (ids >= 0) & (ids < self.num_local)  # on the state's own device (the host, from a file)
        self._slot_R, self.size = None, 0
        self._rows_S = self._rows_S[:0]
        self._bufs = {k: v[:0] for k, v in self._bufs.items()}
        slots = self.slots(ids[mine].to(self.device))
        for k in self._bufs:
            self._bufs[k][slots] = sd[k][mine].to(self.device, self._bufs[k].dtype)


class DenseRowState:
    """Named per-row state tensors of shape (R, *trailing) for every row of the shard, allocated
    zero at construction and indexed by local row (a row's slot is its local row). A row has state
    once it has been updated: the optimizer's per-row update count "step" (incremented by every
    update of a row: AdamW, adam_rowwise, stochastic rounding) says which rows have been, or where
    the optimizer keeps none (row-wise Adagrad) a bool per row that `slots` sets. The state of a
    row without state is zero, so the update reads no differently; only its fp32 master copy starts
    from the stored row (`RowSparseOptimizer._current`), and the state dict lists only these rows."""

    def __init__(self, table: ValueTable, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.row_start, self.num_local = table.row_start, table.row_end - table.row_start
        self.device, self.specs = table.weight.device, specs
        self._bufs = {k: torch.zeros((self.num_local, *shape), dtype=dt, device=self.device)
                      for k, (shape, dt) in specs.items()}
        self._updated_R = None if "step" in specs else torch.zeros(self.num_local, dtype=torch.bool, device=self.device)

    def __len__(self) -> int:
        return int(self._has_state().sum())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._bufs[name]

    def _has_state(self, rows_U: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> has_U (bool): whether each of these local rows (default: every row, has_R) has been
        updated, read from the U rows' marks only (a step allocates nothing of the shard's size)."""
        marks = self._bufs["step"] if self._updated_R is None else self._updated_R
        return (marks if rows_U is None else marks.index_select(0, rows_U)) != 0

    def slots(self, rows_U: torch.Tensor) -> torch.Tensor:
        """-> slots_U: the rows themselves (marking them as having state)."""
        if self._updated_R is not None:
            self._updated_R.index_fill_(0, rows_U, True)
        return rows_U

    def claim(self, rows_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (slots_U, new_N) as `RowState.claim`: the rows, and the positions in rows_U of the rows
        not updated before. Where "step" marks them, a row is new until the optimizer's update
        counts it, so call this before the update (`RowSparseOptimizer._current` does)."""
        new_U = ~self._has_state(rows_U)
        return self.slots(rows_U), new_U.nonzero().squeeze(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"ids": global row ids_S, name: state_S...} of the S rows with state, as `RowState`'s."""
        rows_S = self._has_state().nonzero().squeeze(1)
        out = {"ids": rows_S + self.row_start}
        out.update({k: v.index_select(0, rows_S) for k, v in self._bufs.items()})
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the rows of this shard from a state dict of any shard layout (either layout's);
        every other row is left without state. In place: nothing of the shard's size is allocated."""
        missing = set(self.specs) - set(sd)
        if missing:
            raise KeyError(f"optimizer row state lacks {sorted(missing)}: was it saved by another optimizer?")
        ids = sd["ids"].long() - self.row_start
        mine = (ids >= 0) & (ids < self.num_local)  # on the state's own device (the host, from a file)
        rows_S = ids[mine].to(self.device)
        for k, buf in self._bufs.items():
            buf.zero_().index_copy_(0, rows_S, sd[k][mine].to(self.device, buf.dtype))
        if self._updated_R is not None:
            self._updated_R.zero_().index_fill_(0, rows_S, True)
