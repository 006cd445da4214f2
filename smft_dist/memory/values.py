"""The memory value table interface and its single-process implementation.

Shape legend: T tokens, K slots per token (heads x knn), U unique slot ids, D value dim,
R rows held by this rank (its shard), N rows in the whole table.

A `ValueTable` holds rows ``[row_start, row_end)`` of an N x D table. The memory layer only calls
`embedding_bag`; subclasses implement two primitives that may communicate:

- `fetch(ids_U, counts_U) -> rows_UD`: return the rows for globally unique ids; the owners record
  `counts_U` as accesses of this step (the TF-IDF counts ride on the lookup's own routing) when
  `records_accesses()`: in forwards that may train (grad enabled) and inside `counting_accesses`
  (the df pass), never in inference or generation, so those cannot grow the per-step buffers;
- `push_grad(ids_U, grad_UD)`: send row gradients to their owners, which accumulate them into a
  row-sparse gradient of their shard.

The table's weight is never part of autograd's graph: a lookup detaches the fetched rows and
hooks their gradient, so the gradient of the table is always row-sparse (ids + rows) and never
an N x D tensor, and no dense engine (DeepSpeed, FSDP) ever sees a gradient for it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RowSparse:
    """Accumulates (local row id, value) pairs; `coalesce()` sums duplicates. O(rows touched)."""

    def __init__(self):
        self._ids: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, vals: torch.Tensor) -> None:
        if ids.numel():
            self._ids.append(ids)
            self._vals.append(vals)

    def scale_(self, factor: float) -> None:
        self._vals = [v * factor for v in self._vals]

    def clear(self) -> None:
        self._ids.clear()
        self._vals.clear()

    def __bool__(self) -> bool:
        return bool(self._ids)

    def __len__(self) -> int:
        """Number of added (or coalesced) entries, a mark for `split_off`."""
        return len(self._ids)

    def split_off(self, start: int) -> "RowSparse":
        """Remove the entries after the first `start` and return them as a new accumulator."""
        rest = RowSparse()
        rest._ids, rest._vals = self._ids[start:], self._vals[start:]
        del self._ids[start:], self._vals[start:]
        return rest

    def coalesce(self, trailing: tuple = (), dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sorted unique ids_U, summed values_U...). Empty tensors when nothing was added."""
        if not self._ids:
            return (torch.empty(0, dtype=torch.long, device=device), torch.zeros((0, *trailing), dtype=dtype, device=device))
        uniq, out = sum_by_id(torch.cat(self._ids), torch.cat(self._vals))
        self._ids, self._vals = [uniq], [out]
        return uniq, out


def sum_by_id(ids_N: torch.Tensor, vals_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sorted unique ids_U, vals_U...: the sum of the rows of vals_N that have that id).

    Bitwise the same on every run and device for the same ordered input: the rows of one id are
    summed pairwise in the order they were added, ((v0 + v1) + (v2 + v3)) + ..., by elementwise
    adds at fixed positions. An accumulating scatter (`index_add_`, `scatter_add_`, `index_put_`
    with accumulate) leaves the order of each float sum to the CUDA scheduler's atomics, so
    replicas summing the same gathered rows could differ in the last bit and then diverge
    (distributed/replicas.py fails such a run). O(N log m) for at most m rows per id.
    """
    ids_sorted_N, perm_N = torch.sort(ids_N, stable=True)  # one id's rows contiguous, in arrival order
    vals = vals_N.index_select(0, perm_N)
    uniq_U, counts_U = torch.unique_consecutive(ids_sorted_N, return_counts=True)
    # position of each row within its id's run (integer cumsum: exact in any order)
    starts_U = counts_U.cumsum(0) - counts_U
    pos = torch.arange(ids_N.numel(), device=ids_N.device) - starts_U.repeat_interleave(counts_U)
    while vals.shape[0] > uniq_U.numel():  # halve every run: row 2j absorbs row 2j + 1 of its id
        head = pos % 2 == 0
        paired = head.clone()
        paired[-1] = False
        paired[:-1] &= pos[1:] > 0  # the next row has the same id
        summed = vals[head]
        summed[paired[head]] += vals[1:][paired[:-1]]
        vals, pos = summed, pos[head] // 2
    return uniq_U, vals


class ValueTable(nn.Module):
    """Rows [row_start, row_end) of an N x D memory value table (see module docstring)."""

    group = None  # the memory-parallel process group of a sharded table (None: not sharded)
    replicate_group = None  # ranks holding the same rows (None: no replicas)

    def __init__(self, num_rows: int, dim: int, row_start: int, row_end: int, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if not 0 <= row_start <= row_end <= num_rows:
            raise ValueError(f"bad shard [{row_start}, {row_end}) of a table with {num_rows} rows")
        self.num_rows, self.dim, self.row_start, self.row_end = num_rows, dim, row_start, row_end
        # requires_grad=False: gradients flow through `_grad` (row-sparse), never `.grad`.
        self.weight = nn.Parameter(torch.empty(row_end - row_start, dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self.trainable = True  # whether lookups hook row gradients (False: frozen memory)
        self.counting = False  # record accesses without grad too (set by `counting_accesses`)
        self._counts = RowSparse()  # this step's access counts of local rows
        self._grad = RowSparse()  # this step's row-sparse gradient of local rows
        self._grad_allowed: Optional[torch.Tensor] = None  # sorted global ids allowed to get grads

    # ----- initialisation -----
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """N(0, D^-1/2) as in docs/design.md §1.1. With a generator, a shard draws the same values that
        rows [row_start, row_end) of a full table drawn with that generator would get."""
        std = self.dim ** -0.5
        with torch.no_grad():
            if generator is None:
                self.weight.normal_(0.0, std)
                return
            # Draw row blocks in a fixed order so shards agree with the unsharded table.
            block = 1 << 16
            for start in range(0, self.row_end, block):
                stop = min(start + block, self.num_rows)
                rows = torch.empty(stop - start, self.dim).normal_(0.0, std, generator=generator)
                lo, hi = max(start, self.row_start), min(stop, self.row_end)
                if lo < hi:
                    self.weight[lo - self.row_start:hi - self.row_start] = rows[lo - start:hi - start]

    # ----- primitives (may communicate) -----
    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        raise NotImplementedError

    def records_accesses(self) -> bool:
        """Whether a lookup now counts as TF-IDF accesses: a forward that may train, or the df pass.
        The same on every rank of a lookup (they run the same step), so owners agree with requesters."""
        return self.counting or torch.is_grad_enabled()

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.row_start) & (ids < self.row_end)

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            bad = ids[(ids < 0) | (ids >= self.num_rows)][:5].tolist()
            raise IndexError(
                f"memory slot ids {bad} are outside [0, {self.num_rows}): the model's memory_n_keys^2 "
                "must match the table's row count (check the checkpoint and the config)"
            )

    # ----- the lookup the memory layer uses -----
    def embedding_bag(self, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """y_TD[t] = sum_k w_TK[t, k] * V[idx_TK[t, k]]; gradients reach w_TK and (row-sparse) V.

        Collective for sharded tables: every rank of the group must call it, possibly with T = 0.
        """
        ids_U, inv_TK, counts_U = torch.unique(idx_TK.reshape(-1), return_inverse=True, return_counts=True)
        rows_UD = self.fetch(ids_U, counts_U).to(w_TK.dtype)
        if self.trainable and torch.is_grad_enabled():
            rows_UD = rows_UD.detach().requires_grad_(True)
            rows_UD.register_hook(lambda g, ids=ids_U: self._backward_rows(ids, g))
        return F.embedding_bag(inv_TK.view(idx_TK.shape), rows_UD, per_sample_weights=w_TK, mode="sum")

    def _backward_rows(self, ids_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        if self._grad_allowed is not None:
            # Only the selected rows' gradients leave this rank (docs/design.md §2.4).
            keep = torch.isin(ids_U, self._grad_allowed)
            ids_U, grad_UD = ids_U[keep], grad_UD[keep]
        self.push_grad(ids_U, grad_UD.float())

    # ----- per-step sparse state -----
    def restrict_grad_to(self, global_ids: Optional[torch.Tensor]) -> None:
        """Limit the next backward's row gradients to these global ids (None: all touched rows)."""
        self._grad_allowed = None if global_ids is None else torch.sort(global_ids.to(torch.long)).values

    def access_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (local row ids_R', counts_R' int64): this step's accesses of this shard's rows."""
        return self._counts.coalesce(dtype=torch.long, device=self.weight.device)

    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (local row ids_R', grad_R'D fp32): this step's row-sparse gradient of this shard."""
        return self._grad.coalesce((self.dim,), device=self.weight.device)

    def scale_grad_(self, factor: float) -> None:
        """Scale this step's row gradients: the trainer turns the sum over data-parallel ranks
        into the mean (what DDP/DeepSpeed do for the dense weights) with factor 1/world."""
        self._grad.scale_(factor)

    def sync_replicas(self) -> None:
        """Combine this step's gradients and counts with the replicas of these rows (after
        backward). Nothing to do without replicas."""

    def zero_step(self) -> None:
        """Forget this step's counts and gradients (call at the start of every step)."""
        self._counts.clear()
        self._grad.clear()
        self._grad_allowed = None


class LocalValueTable(ValueTable):
    """The whole table in one process (world size 1, tests, export)."""

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_rows, dim, 0, num_rows, dtype=dtype, device=device)

    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids_U)
        if self.records_accesses():
            self._counts.add(ids_U, counts_U)
        return self.weight.detach()[ids_U]

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        self._grad.add(ids_U, grad_UD)


@contextmanager
def counting_accesses(tables: Iterable[ValueTable]):
    """Record lookups' accesses also without grad: the forward-only df pass (build_background_index)."""
    tables = list(tables)
    for t in tables:
        t.counting = True
    try:
        yield
    finally:
        for t in tables:
            t.counting = False
