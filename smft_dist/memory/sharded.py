"""Row-sharded memory value table with a sparse all-to-all lookup (docs/design.md §2.3).

Shape legend: U unique ids this rank requests, I ids this rank receives as an owner (sum of its
receive splits), D value dim, M ranks in the memory-parallel (mp) group, R rows of this shard.

`fetch` runs TorchRec's three stages with one `_Route` between them:

1. distribute ids: bucket the unique ids by owner (sorted ids => owners contiguous), all-to-all
   the split sizes, then the ids with their access counts;
2. local lookup: each owner records the counts it received (so it holds the *global* access count
   of its rows: the TF-IDF c(i)) and gathers the requested rows of its shard;
3. distribute values: all-to-all the rows back; the requester restores its own order.

`push_grad` is the reverse route: row gradients go back to the owners, which add them to a
row-sparse gradient (local ids + rows) of their shard: O(rows touched), never R x D or N x D.

Worked example: 7 rows, rank 0 owns [0, 4), rank 1 owns [4, 7)::

    rank 0: fetch(ids [1, 5, 6], counts [2, 1, 1])   rank 1: fetch(ids [5], counts [3])
    send splits        [1, 2]                                 [0, 1]
    received ids       [1] (from itself)                      [5, 6] from rank 0, [5] from itself
    counts recorded    local row 1: 2                         local rows [1, 2, 1]: [1, 1, 3]
                                                              -> row 5 has global count 4
    rows returned      [V1, V5, V6]                           [V5]

Backward with the same ids reuses the route (only a tiny exchange of the split sizes, to agree on
that); after `restrict_grad_to` the ids are a subset and are exchanged again before the rows.

How the table is kept out of the dense engine (DeepSpeed ZeRO, FSDP2, DDP):

- it is not a registered submodule, parameter or buffer of the model: `shard_memory` attaches it
  with `ProductKeyMemory.set_value_table(table, register=False)`, so it is absent from
  `model.parameters()` / `state_dict()` and the engine never broadcasts it from rank 0 at start-up
  (each rank builds its own shard), never all-reduces / reduce-scatters or gathers it;
- `weight` has `requires_grad=False` and never gets a `.grad`: a lookup detaches the fetched rows
  and hooks their gradient (ValueTable.embedding_bag), which arrives here as a row-sparse gradient.

Gradient scale: the row gradient is the SUM over every rank's loss (each rank's rows are pushed to
the owner and added; `sync_replicas` adds the replicas'), whereas a dense engine AVERAGES over data
parallel ranks: divide by the world size (or scale the memory lr) for the same mean-loss step.

All collectives are entered by every rank of the group, also with zero tokens (empty splits).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from smft_dist.memory.plan import RowShardPlan
from smft_dist.memory.values import ValueTable


@dataclass
class _Route:
    """What the forward exchange decided; the backward runs it in reverse."""

    ids_U: torch.Tensor  # the ids as passed to fetch: `push_grad` with this very tensor reuses the route
    perm_U: Optional[torch.Tensor]  # ids_U[perm_U] is sorted (grouped by owner); None: already sorted
    send_splits: list[int]  # ids sent to each owner (per mp rank)
    recv_splits: list[int]  # ids received from each requester (per mp rank)
    recv_local_I: torch.Tensor  # local row ids received, in arrival order


def _permute(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    return x if perm is None else x.index_select(0, perm)


class ShardedValueTable(ValueTable):
    """Rows `RowShardPlan(num_rows, M).bounds(mp_rank)` of an N x D table, looked up by sparse
    all-to-all over `group` (the mp group). `group=None`: a single process owning every row.

    `replicate_group` (None when dp_replicate == 1) holds the ranks with the same shard;
    `sync_replicas()` combines their per-step gradients and counts.
    `bytes_sent` counts bytes this rank put on the wire per phase ("fwd", "bwd", "sync").
    """

    def __init__(self, num_rows: int, dim: int, group: Optional[dist.ProcessGroup] = None,
                 replicate_group: Optional[dist.ProcessGroup] = None, dtype: torch.dtype = torch.float32,
                 device=None):
        mp_size = dist.get_world_size(group) if group is not None else 1
        mp_rank = dist.get_rank(group) if group is not None else 0
        plan = RowShardPlan(num_rows, mp_size)
        super().__init__(num_rows, dim, *plan.bounds(mp_rank), dtype=dtype, device=device)
        self.plan, self.mp_size, self.mp_rank = plan, mp_size, mp_rank
        self.group, self.replicate_group = group, replicate_group
        self.bytes_sent: Counter = Counter()
        self._route: Optional[_Route] = None
        self._synced = {"grad": 0, "counts": 0}  # entries of each accumulator already summed over replicas

    @classmethod
    def from_context(cls, num_rows: int, dim: int, ctx, dtype: torch.dtype = torch.float32) -> "ShardedValueTable":
        """This rank's shard for a `smft_dist.distributed.DistContext`."""
        return cls(num_rows, dim, ctx.mp_group, ctx.replicate_group, dtype=dtype, device=ctx.device)

    # ----- communication helpers -----
    def _all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], phase: str) -> torch.Tensor:
        """Send x[rows in_splits[j]] to mp rank j; receive out_splits[j] rows from j."""
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        if self.mp_size == 1:
            out.copy_(x)
            return out
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        remote = sum(in_splits) - in_splits[self.mp_rank]  # rows to itself never leave the rank
        self.bytes_sent[phase] += remote * math.prod(x.shape[1:]) * x.element_size()
        return out

    def _exchange(self, msg_MC: torch.Tensor, phase: str) -> torch.Tensor:
        """Row j of msg_MC goes to mp rank j; row j of the result came from mp rank j."""
        ones = [1] * self.mp_size
        return self._all_to_all(msg_MC, ones, ones, phase)

    def _bucket(self, ids_U: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
        """-> (ids sorted, hence grouped by owner; the sorting permutation, None when the ids were
        already sorted, as those of torch.unique are; ids per owner)."""
        perm_U = None
        if ids_U.numel() > 1 and not bool((ids_U[1:] > ids_U[:-1]).all()):
            ids_U, perm_U = torch.sort(ids_U)
        send = torch.bincount(self.plan.owner_of(ids_U), minlength=self.mp_size)  # M-long, not N
        return ids_U, perm_U, send.tolist()

    # ----- primitives -----
    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor) -> torch.Tensor:
        """rows_UD = V[ids_U] for unique global ids; owners record counts_U. Collective."""
        self.check_ids(ids_U)
        # 1. distribute ids: split sizes first, then (id, count) pairs
        sorted_U, perm_U, send_splits = self._bucket(ids_U)
        recv_splits = self._exchange(torch.tensor(send_splits, device=ids_U.device), "fwd").tolist()
        req_U2 = torch.stack([sorted_U, _permute(counts_U, perm_U).to(torch.long)], dim=1)
        got_I2 = self._all_to_all(req_U2, recv_splits, send_splits, "fwd")
        local_I = got_I2[:, 0] - self.row_start
        # 2. local lookup; the counts arrive here from every requester: global c(i) of our rows
        if self.records_accesses():
            self._counts.add(local_I, got_I2[:, 1])
        rows_ID = self.weight.detach().index_select(0, local_I)
        # 3. distribute rows back, then undo the sort
        rows_UD = self._all_to_all(rows_ID, send_splits, recv_splits, "fwd")
        if perm_U is not None:
            rows_UD = torch.empty_like(rows_UD).index_copy_(0, perm_U, rows_UD)
        self._route = _Route(ids_U, perm_U, send_splits, recv_splits, local_I)
        return rows_UD

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor) -> None:
        """Send row gradients of (a subset of) the fetched ids to their owners. Collective."""
        route = self._route
        reuse = route is not None and ids_U is route.ids_U
        if reuse:
            perm_U, send_splits = route.perm_U, route.send_splits
        else:
            _, perm_U, send_splits = self._bucket(ids_U)
        # Agree on the route: each rank tells each owner its split size and whether it reuses the
        # forward route; the ids need to travel again only if some rank cannot reuse it.
        msg_M2 = torch.tensor([[s, int(reuse)] for s in send_splits], device=ids_U.device)
        got_M2 = self._exchange(msg_M2, "bwd")
        recv_splits, all_reuse = got_M2[:, 0].tolist(), bool(got_M2[:, 1].all())
        if all_reuse:
            local_I = route.recv_local_I
        else:
            sorted_U = _permute(ids_U, perm_U)
            local_I = self._all_to_all(sorted_U, recv_splits, send_splits, "bwd") - self.row_start
        grad_ID = self._all_to_all(_permute(grad_UD, perm_U), recv_splits, send_splits, "bwd")
        self._grad.add(local_I, grad_ID)

    # ----- replicas (dp_replicate > 1) -----
    def sync_replicas(self) -> None:
        """Sum the row-sparse gradient and access counts recorded since the previous call over the
        replicas of this shard, so every replica holds the same (and applies the same update).
        Collective over `replicate_group`; no-op without replicas. Safe to call twice a step (counts
        after the forward, gradients after the backward): nothing is summed twice. Bit for bit: the
        all-gather leaves every replica the same entries in the same (replica) order, and
        `RowSparse.coalesce` sums them in an order fixed by theirs, on CUDA too."""
        if self.replicate_group is None:
            return
        dev = self.weight.device
        for name, acc, trailing, dtype in (("grad", self._grad, (self.dim,), torch.float32),
                                           ("counts", self._counts, (), torch.long)):
            new = acc.split_off(self._synced[name])
            ids, vals = self._all_gather_padded(*new.coalesce(trailing, dtype=dtype, device=dev))
            acc.add(ids, vals)
            self._synced[name] = len(acc)

    def _all_gather_padded(self, ids_U: torch.Tensor, vals_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate (ids, vals) of every replica. Pads to the longest: gloo's all_gather
        cannot take tensors of unequal sizes."""
        group, W = self.replicate_group, dist.get_world_size(self.replicate_group)
        sizes_W = ids_U.new_zeros(W)
        dist.all_gather_into_tensor(sizes_W, ids_U.new_tensor([ids_U.numel()]), group=group)
        L = int(sizes_W.max())
        out = []
        for x in (ids_U, vals_U):
            pad = x.new_zeros((L, *x.shape[1:]))
            pad[:x.shape[0]] = x
            full = x.new_empty((W * L, *x.shape[1:]))
            dist.all_gather_into_tensor(full, pad, group=group)
            self.bytes_sent["sync"] += (W - 1) * pad.numel() * pad.element_size()
            out.append(full)
        valid = torch.arange(L, device=ids_U.device)[None, :] < sizes_W[:, None]  # W x L
        return out[0][valid.reshape(-1)], out[1][valid.reshape(-1)]

    def zero_step(self) -> None:
        super().zero_step()
        self._route = None
        self._synced = {"grad": 0, "counts": 0}
