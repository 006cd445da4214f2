"""Optimizer state for the rows of one value-table shard that have ever been updated.

Shape legend: R rows of this shard, S rows holding state, U rows updated this step, D value dim.

Sparse finetuning touches a few hundred rows per step out of millions, so the state is kept only
for rows that were updated: a growing buffer per state tensor (capacity doubles, so appending U
rows is amortised O(U x D), but stops at the shard's R rows: `capacity_for`) and an int32 row ->
slot map. The map costs 4 bytes per row of the shard (not R x D): it makes lookups and inserts
O(U), where a sorted id index would re-sort all S ids every step.
"""
from __future__ import annotations

import math

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
        if self._slot_R is None:
            self._slot_R = torch.full((self.num_local,), -1, dtype=torch.int32, device=self.device)
        slots_U = self._slot_R[rows_U].long()
        new = slots_U < 0
        if new.any():
            n_new = int(new.sum())
            self._reserve(self.size + n_new)
            fresh = torch.arange(self.size, self.size + n_new, device=self.device)
            self._slot_R[rows_U[new]] = fresh.int()
            self._rows_S[fresh] = rows_U[new]
            slots_U[new] = fresh
            self.size += n_new
        return slots_U

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
