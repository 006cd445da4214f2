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
hooks their gradient (a sharded table's pooled lookup instead computes the rows' gradients at
their owners, memory/sharded.py), so the gradient of the table is always row-sparse (ids + rows) and never
an N x D tensor, and no dense engine (DeepSpeed, FSDP) ever sees a gradient for it.

Host offload (`offload_to_host`, the config key model.memory_offload=host, docs/offload.md): the
shard `weight` lives in host memory (pinned where CUDA exists) and the lookups compute on
`compute_device`. Every read of rows goes through `unique_rows`: one gather of the unique rows on
the host and one copy to the device. Every row gradient the owner keeps (`_keep_grad`: one lookup's,
after the exchange) moves to the host at once (O(rows touched)), so the device holds one lookup's
row gradients at a time, not the step's (optim.grad_accum micro-batches x memory layers); each
is added at once into the shard's host sum (`ShardRowSum`, the shard's rows in fp32, in the order
a resident table's `sparse_grad` adds its entries: the same bits; sparse finetuning keeps the
entries instead), which the memory optimizer, following `weight.device`, reads to update the
shard and its row state there. `moved_rows` /
`moved_bytes` count what crossed, per direction. A resident table reads through the same method,
without the copy, and keeps its row gradients on the device.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OFFLOADS = ("none", "host")  # model.memory_offload


class RowSparse:
    """Accumulates (local row id, value) pairs; `coalesce()` sums duplicates. O(rows touched)."""

    def __init__(self):
        self._ids: list[torch.Tensor] = []
        self._vals: list[torch.Tensor] = []
        self._unique: list[bool] = []  # per entry: its ids are sorted and unique (a host-side fact)

    def add(self, ids: torch.Tensor, vals: torch.Tensor, sorted_unique: bool = False) -> None:
        """sorted_unique: the caller knows the ids ascend without repeats (torch.unique's do, and any
        subset of them): an accumulator holding one such entry is already coalesced."""
        if ids.numel():
            self._ids.append(ids)
            self._vals.append(vals)
            self._unique.append(sorted_unique)

    def clear(self) -> None:
        self._ids.clear()
        self._vals.clear()
        self._unique.clear()

    def __bool__(self) -> bool:
        return bool(self._ids)

    def __len__(self) -> int:
        """Number of added (or coalesced) entries, a mark for `split_off`."""
        return len(self._ids)

    def split_off(self, start: int) -> "RowSparse":
        """Remove the entries after the first `start` and return them as a new accumulator."""
        rest = RowSparse()
        rest._ids, rest._vals, rest._unique = self._ids[start:], self._vals[start:], self._unique[start:]
        del self._ids[start:], self._vals[start:], self._unique[start:]
        return rest

    def coalesce(self, trailing: tuple = (), dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sorted unique ids_U, summed values_U...). Empty tensors when nothing was added.
        One entry of sorted unique ids (one micro-batch's rows on one rank) is returned as it is:
        no work and no host sync, decided on the host."""
        if not self._ids:
            return (torch.empty(0, dtype=torch.long, device=device), torch.zeros((0, *trailing), dtype=dtype, device=device))
        if len(self._ids) == 1 and self._unique[0]:
            return self._ids[0], self._vals[0]
        ids, vals, unique = self._ids, self._vals, self._unique
        self._ids, self._vals, self._unique = [], [], []
        uniq, out = sum_entries_by_id(ids, vals, unique)  # frees each entry once it has added it
        self._ids, self._vals, self._unique = [uniq], [out], [True]
        return uniq, out


SUM_CHUNK_ELEMENTS = 1 << 26  # values one gather-add-write of `add_rows_in_order` moves at a time (256 MB of fp32)


def add_rows_in_order(out_R: torch.Tensor, idx_N: torch.Tensor, vals_N: torch.Tensor, unique: bool,
                      chunk_elements: int = SUM_CHUNK_ELEMENTS) -> None:
    """out_R[idx_N[i]] += vals_N[i] for i = 0, 1, ..., N - 1: each row of out_R gets its additions
    one after another, in that order, by elementwise adds at fixed positions (a gather, an add, a
    write-back of rows that do not repeat), so the bits are the same on every run and device. An
    accumulating scatter (`index_add_`, `scatter_add_`, `index_put_` with accumulate) would leave
    the order of each float sum to the CUDA scheduler's atomics, so replicas summing the same rows
    could differ in the last bit and then diverge (distributed/replicas.py fails such a run).

    `unique`: the caller knows idx_N has no repeats. Otherwise each row's k-th addition goes in the
    k-th pass (two host reads: how many passes, and the rows of each). Temporaries: three of a chunk of about
    `chunk_elements` values; the repeats' int64 bookkeeping is O(N) ints."""
    N = idx_N.numel()
    if not N:
        return
    rows = max(1, chunk_elements // max(1, math.prod(vals_N.shape[1:])))
    if unique:
        passes, order = [N], None
    else:
        ids_sorted, perm = torch.sort(idx_N, stable=True)  # one id's rows contiguous, in arrival order
        head = torch.ones_like(ids_sorted, dtype=torch.bool)
        head[1:] = ids_sorted[1:] != ids_sorted[:-1]
        run = head.cumsum(0) - 1  # integer cumsum: exact in any order
        k_sorted = torch.arange(N, device=idx_N.device) - torch.searchsorted(run, run)  # the k of each row's addition
        k_N = torch.empty_like(k_sorted).index_copy_(0, perm, k_sorted)
        k_by_pass, order = torch.sort(k_N, stable=True)  # pass by pass, arrival order within a pass
        passes = torch.unique_consecutive(k_by_pass, return_counts=True)[1].tolist()
    start = 0
    for n in passes:
        for c in range(start, start + n, rows):
            sel = slice(c, min(c + rows, start + n))
            if order is None:
                at, add = idx_N[sel], vals_N[sel]
            else:
                at, add = idx_N.index_select(0, order[sel]), vals_N.index_select(0, order[sel])
            out_R.index_copy_(0, at, out_R.index_select(0, at) + add)
        start += n


def sum_by_id(ids_N: torch.Tensor, vals_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sorted unique ids_U, vals_U...: the sum of the rows of vals_N that have that id, added
    one after another in their order in vals_N: ((v0 + v1) + v2) + ...). vals_N is not changed."""
    return sum_entries_by_id([ids_N], [vals_N], [False])


def sum_entries_by_id(ids: list[torch.Tensor], vals: list[torch.Tensor], unique: list[bool],
                      chunk_elements: int = SUM_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_by_id` of the entries (ids[j], vals[j]) concatenated in order, `unique[j]`: entry j's
    ids do not repeat. Each id's rows are added in arrival order into a U-row output (starting from
    zeros: 0 + v0 is v0), entry by entry, and each entry is popped from the lists once added (freed
    unless the caller holds it). Memory beyond the entries: the output, the ids' inverse (N int64)
    and `add_rows_in_order`'s chunk temporaries. One host read (U, by torch.unique), and two per
    entry with repeated ids."""
    uniq_U, inv_N = torch.unique(torch.cat(ids), return_inverse=True)
    out = vals[0].new_zeros((uniq_U.numel(), *vals[0].shape[1:]))
    start = 0
    while vals:
        n = ids.pop(0).numel()
        add_rows_in_order(out, inv_N[start:start + n], vals.pop(0), unique.pop(0), chunk_elements)
        start += n
    return uniq_U, out


class ShardRowSum:
    """The step's row gradients of an offloaded shard (`ValueTable.offload_to_host`), summed on
    the host as they arrive: a dense R x D fp32 buffer, allocated at the first gradient and kept,
    that each kept entry is added into (`add_rows_in_order`), and the ids that were added. Its
    host memory is the shard's rows, whatever the skew and the number of lookups a step; keeping the
    entries until the step (`RowSparse`) would take every lookup's rows. Each row's sum is its
    entries added one after another in arrival order, as `RowSparse.coalesce` adds them: the same
    bits as a resident table. Per step O(rows touched): `clear` zeroes only the rows added."""

    def __init__(self, rows: int, dim: int):
        self.rows, self.dim = rows, dim
        self.sum_RD: Optional[torch.Tensor] = None
        self._ids: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, vals: torch.Tensor, sorted_unique: bool = False) -> None:
        if not ids.numel():
            return
        if self.sum_RD is None:
            self.sum_RD = torch.zeros(self.rows, self.dim, dtype=torch.float32, device=vals.device)
        add_rows_in_order(self.sum_RD, ids, vals, unique=sorted_unique)
        self._ids.append(ids)

    def _touched(self) -> torch.Tensor:
        return torch.unique(torch.cat(self._ids))

    def coalesce(self, trailing: tuple = (), dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (sorted unique ids_U, their sums: a copy, U x D)."""
        if not self._ids:
            return torch.empty(0, dtype=torch.long, device=device), torch.zeros(0, self.dim, dtype=dtype, device=device)
        ids_U = self._touched()
        return ids_U, self.sum_RD.index_select(0, ids_U)

    def clear(self) -> None:
        if self._ids:
            self.sum_RD.index_fill_(0, self._touched(), 0.0)
            self._ids.clear()

    def __bool__(self) -> bool:
        return bool(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def split_off(self, start: int) -> RowSparse:
        """The sums added since entry `start`, as one entry, and forget them: 0 (all of them: the
        replicas' sync after backward, `ShardedValueTable.sync_replicas`) or every entry (nothing new).
        A sum cannot be split at an entry in between."""
        rest = RowSparse()
        if start == len(self._ids):
            return rest
        if start != 0:
            raise ValueError(f"a summed shard gradient splits at entry 0 or {len(self._ids)}, not {start}")
        ids_U, sums_UD = self.coalesce()
        rest.add(ids_U, sums_UD, sorted_unique=True)
        self.clear()
        return rest


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
        self._grad: RowSparse | ShardRowSum = RowSparse()  # this step's row-sparse gradient of local rows
        self.grad_scale = 1.0  # what each kept row gradient is multiplied by as it arrives (set_grad_scale)
        self._grad_allowed: Optional[torch.Tensor] = None  # sorted global ids allowed to get grads
        self.offload = "none"  # "host": `weight` lives in host memory (offload_to_host)
        self._compute_device: Optional[torch.device] = None  # where lookups compute when offloaded
        # Host <-> device traffic of an offloaded shard, cumulative, per direction: "h2d" the rows
        # lookups read (and their ids, "d2h"), "d2h" also the row gradients `_keep_grad` hands over.
        self.moved_rows: Counter = Counter()
        self.moved_bytes: Counter = Counter()

    # ----- placement -----
    @property
    def compute_device(self) -> torch.device:
        """Where lookups, their gradients and the access counts live: the weight's device, or for an
        offloaded shard the device it was on before `offload_to_host`."""
        return self._compute_device if self.offload == "host" else self.weight.device

    def offload_to_host(self, dense_grad_sum: bool = True) -> None:
        """Keep the shard in host memory (pinned where CUDA exists, so copies to the device run at
        full bandwidth); lookups keep computing on the current device. Call before a memory
        optimizer is built: its row state follows `weight.device` (optim/row_state.py).

        dense_grad_sum: sum the row gradients on the host as they arrive (`ShardRowSum`, the
        shard's rows in fp32), for a memory that trains every touched row (pretraining, full
        finetuning); False keeps each entry on the host until the step (`RowSparse`), for sparse
        memory finetuning, whose few selected rows would not pay for the shard's rows in fp32.
        The same bits either way."""
        if self.offload == "host":
            return
        self._compute_device = self.weight.device
        host_RD = torch.empty(self.weight.shape, dtype=self.weight.dtype, device="cpu",
                              pin_memory=torch.cuda.is_available())
        host_RD.copy_(self.weight.detach())
        self.weight.data = host_RD  # the same Parameter: whoever holds it sees the host shard
        if dense_grad_sum:
            self._grad = ShardRowSum(self.row_end - self.row_start, self.dim)
        self.offload = "host"

    def unique_rows(self, local_ids_I: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (rows_UD on compute_device, inv_I): rows_UD[inv_I] == weight[local_ids_I].

        Resident: the whole shard and the ids themselves (no copy). Offloaded: the unique ids go
        to the host (ids_U x 8 bytes), the host gathers their rows in one index_select (into
        pinned memory where CUDA exists) and one copy moves them to the device (U x D x element
        bytes); both are counted in `moved_rows` / `moved_bytes`. On a CPU run host == device:
        the same gather and (no-op) copy run, so the values are those of a resident table."""
        weight_RD = self.weight.detach()
        if self.offload != "host":
            return weight_RD, local_ids_I
        uniq_U, inv_I = torch.unique(local_ids_I, return_inverse=True)
        U = uniq_U.numel()
        host_ids_U = uniq_U.to("cpu")
        rows_UD = torch.empty((U, self.dim), dtype=weight_RD.dtype, pin_memory=weight_RD.is_pinned())
        torch.index_select(weight_RD, 0, host_ids_U, out=rows_UD)
        self.moved_rows["h2d"] += U
        self.moved_bytes["h2d"] += U * self.dim * weight_RD.element_size()
        self.moved_bytes["d2h"] += U * host_ids_U.element_size()
        return rows_UD.to(self.compute_device, non_blocking=True), inv_I.to(torch.long)

    def read_rows(self, local_ids_I: torch.Tensor) -> torch.Tensor:
        """-> weight[local_ids_I] on compute_device (each unique row moved once when offloaded)."""
        rows_UD, inv_I = self.unique_rows(local_ids_I)
        return rows_UD.index_select(0, inv_I)

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
    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor, sorted_ids: bool = False,
              in_range: bool = False) -> torch.Tensor:
        """sorted_ids: ids_U ascend (torch.unique's do), so a sharded table need not sort them.
        in_range: the caller guarantees 0 <= ids_U < num_rows, so a table whose check would read
        the ids on the host (a sync) skips it; a sharded table's check rides on its one
        device-to-host copy and always runs."""
        raise NotImplementedError

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor, sorted_ids: bool = False) -> None:
        """sorted_ids: ids_U ascend (a subset of torch.unique's), so the gradient needs no merge
        when it is the step's only one (RowSparse.add's sorted_unique). The table may keep grad_UD
        itself and scale it in place (`set_grad_scale`): pass a tensor nothing else reads."""
        raise NotImplementedError

    def records_accesses(self) -> bool:
        """Whether a lookup now counts as TF-IDF accesses: a forward that may train, or the df pass.
        The same on every rank of a lookup (they run the same step), so owners agree with requesters."""
        return self.counting or torch.is_grad_enabled()

    def owns(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.row_start) & (ids < self.row_end)

    def check_ids(self, ids: torch.Tensor) -> None:
        """One host read (the smallest and largest id together); the hot path skips it (`in_range`)."""
        if not ids.numel():
            return
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()
        if lo < 0 or hi >= self.num_rows:
            bad = ids[(ids < 0) | (ids >= self.num_rows)][:5].tolist()
            raise IndexError(
                f"memory slot ids {bad} are outside [0, {self.num_rows}): the model's memory_n_keys^2 "
                "must match the table's row count (check the checkpoint and the config)"
            )

    # ----- the lookup the memory layer uses -----
    def embedding_bag(self, idx_TK: torch.Tensor, w_TK: torch.Tensor, in_range: bool = False) -> torch.Tensor:
        """y_TD[t] = sum_k w_TK[t, k] * V[idx_TK[t, k]]; gradients reach w_TK and (row-sparse) V.
        in_range: the caller guarantees 0 <= idx_TK < num_rows (the memory layer's product keys
        do), so the ids are not checked where checking would cost a host sync (`fetch`).

        Collective for sharded tables: every rank of the group must call it, possibly with T = 0.
        """
        ids_U, inv_TK, counts_U = torch.unique(idx_TK.reshape(-1), return_inverse=True, return_counts=True)
        rows_UD = self.fetch(ids_U, counts_U, sorted_ids=True, in_range=in_range).to(w_TK.dtype)
        if self.trainable and torch.is_grad_enabled():
            rows_UD = rows_UD.detach().requires_grad_(True)
            rows_UD.register_hook(lambda g, ids=ids_U: self._backward_rows(ids, g))
        with record_function("smft/bag"):
            return F.embedding_bag(inv_TK.view(idx_TK.shape), rows_UD, per_sample_weights=w_TK, mode="sum")

    def _backward_rows(self, ids_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        """ids_U: sorted unique (torch.unique's)."""
        if self._grad_allowed is not None:
            # Only the selected rows' gradients leave this rank (docs/design.md §2.4). Both lists
            # are sorted and unique: isin skips its `unique` of each; the kept positions are the
            # one host read (their number sizes what follows).
            kept = torch.isin(ids_U, self._grad_allowed, assume_unique=True).nonzero().squeeze(1)
            ids_U, grad_UD = ids_U.index_select(0, kept), grad_UD.index_select(0, kept)
        self.push_grad(ids_U, grad_UD.float(), sorted_ids=True)

    # ----- per-step sparse state -----
    def restrict_grad_to(self, global_ids: Optional[torch.Tensor]) -> None:
        """Limit the next backward's row gradients to these global ids (None: all touched rows)."""
        self._grad_allowed = (None if global_ids is None else
                              torch.sort(global_ids.to(self.compute_device, torch.long)).values)

    def access_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (local row ids_R', counts_R' int64): this step's accesses of this shard's rows."""
        return self._counts.coalesce(dtype=torch.long, device=self.compute_device)

    def _keep_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor, sorted_unique: bool = False,
                   scaled: bool = False) -> None:
        """Keep row gradients of this step: local ids_U, grad_UD fp32 (a tensor nothing else reads),
        multiplied in place by `grad_scale` unless `scaled` (the replicas' sums already are).
        Offloaded: moved to the host now (ids and rows, counted "d2h"), so the device holds one
        lookup's row gradients at a time, and added into the shard's host sum (`ShardRowSum`) in
        the order they arrive, the order in which a resident table's `sparse_grad` adds its entries
        (`add_rows_in_order`: elementwise adds at fixed positions, the same bits on any device)."""
        if not scaled and self.grad_scale != 1:  # x * 1 == x bit for bit: no pass over the rows
            grad_UD.mul_(self.grad_scale)
        if self.offload == "host" and ids_U.numel():
            self.moved_rows["d2h"] += ids_U.numel()
            self.moved_bytes["d2h"] += ids_U.numel() * (ids_U.element_size() + self.dim * grad_UD.element_size())
            ids_U, grad_UD = ids_U.to("cpu"), grad_UD.to("cpu")
        self._grad.add(ids_U, grad_UD, sorted_unique=sorted_unique)

    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (local row ids_R', grad_R'D fp32) on weight's device: this step's row-sparse gradient
        of this shard, its entries summed where they are (offloaded: on the host, nothing moves)."""
        return self._grad.coalesce((self.dim,), device=self.weight.device)

    def set_grad_scale(self, factor: float) -> None:
        """Multiply this step's row gradients by `factor` as they arrive (call before the backward;
        `zero_step` resets it to 1): the trainer turns the sum over data-parallel ranks into the
        mean (what DDP/DeepSpeed do for the dense weights) with 1/world. Each entry is scaled
        before it is added, as an offloaded table's host sum needs."""
        self.grad_scale = float(factor)

    def sync_replicas(self) -> None:
        """Combine this step's gradients and counts with the replicas of these rows (after
        backward). Nothing to do without replicas."""

    def zero_step(self) -> None:
        """Forget this step's counts and gradients (call at the start of every step)."""
        self._counts.clear()
        self._grad.clear()
        self._grad_allowed = None
        self.grad_scale = 1.0


class LocalValueTable(ValueTable):
    """The whole table in one process (world size 1, tests, export)."""

    def __init__(self, num_rows: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_rows, dim, 0, num_rows, dtype=dtype, device=device)

    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor, sorted_ids: bool = False,
              in_range: bool = False) -> torch.Tensor:
        if not in_range:
            self.check_ids(ids_U)
        if self.records_accesses():
            self._counts.add(ids_U, counts_U, sorted_unique=sorted_ids)
        return self.read_rows(ids_U)

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor, sorted_ids: bool = False) -> None:
        self._keep_grad(ids_U, grad_UD, sorted_unique=sorted_ids)


def moved_totals(tables: Iterable[ValueTable]) -> tuple[int, int]:
    """-> (rows, bytes) the tables have moved between host and device so far, both directions."""
    tables = list(tables)
    return (sum(sum(t.moved_rows.values()) for t in tables), sum(sum(t.moved_bytes.values()) for t in tables))


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
