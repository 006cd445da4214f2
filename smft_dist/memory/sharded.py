"""Row-sharded memory value table with a sparse all-to-all lookup (docs/design.md §2.3).

Shape legend: U unique ids this rank requests, I ids this rank receives as an owner (sum of its
receive splits), D value dim, M ranks in the memory-parallel (mp) group, R rows of this shard.

`embedding_bag` crosses ranks by one of two exchanges (`exchange`, the config key
dist.memory_exchange, docs/memory_exchange.md): owner-side pooling (`_PooledLookup`: entries to
the owners, T x D partial sums back, row gradients computed where the rows live) or the unique-row
exchange of `fetch` / `push_grad` below; `auto` picks per step by the bytes each would move.
A pooled owner bags its received entries in slices of `owner_slice_rows` (and, offloaded, computes
its row gradients that many rows at a time), so what it holds on the device is bounded however
many ranks' reads land on its shard.

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
that, with one device-to-host copy); after `restrict_grad_to` the ids are a subset and are exchanged again before the rows.

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
import torch.nn.functional as F
from torch.profiler import record_function

from smft_dist.memory.plan import RowShardPlan
from smft_dist.memory.values import ValueTable

EXCHANGES = ("auto", "pooled", "rows")  # dist.memory_exchange


@dataclass
class _Route:
    """What the forward exchange decided; the backward runs it in reverse."""

    ids_U: torch.Tensor  # the ids as passed to fetch: `push_grad` with this very tensor reuses the route
    perm_U: Optional[torch.Tensor]  # ids_U[perm_U] is sorted (grouped by owner); None: already sorted
    send_splits: list[int]  # ids sent to each owner (per mp rank)
    recv_splits: list[int]  # ids received from each requester (per mp rank)
    recv_local_I: torch.Tensor  # local row ids received, in arrival order


@dataclass
class _PooledRoute:
    """How the entries of one pooled lookup travel (E = T x K entries of this rank, I entries it
    receives as an owner); the backward runs the same splits in reverse, no second id exchange."""

    T: int  # this rank's tokens
    K: int  # entries per token
    perm_E: torch.Tensor  # flat entry order grouped by owner, tokens ascending within an owner
    lid_E: torch.Tensor  # int32 local row id at its owner, in perm_E order
    tok_E: torch.Tensor  # int32 token of each entry, in perm_E order
    send: list[int]  # entries this rank sends to each owner
    recv: list[int]  # entries this rank receives from each requester
    tokens: list[int]  # T of each requester
    need_w: list[bool]  # whether each requester wants its lookup weights' gradient
    wire: torch.dtype  # of the partial sums, grad_y and weight gradients: bf16 under bf16 autocast
    records: bool  # the owners record access counts (ValueTable.records_accesses)
    backward: bool  # a backward may follow (grad enabled on every rank)


_DOT_CHUNK = 1 << 14  # entries per chunk of the weight-gradient dot products (bounds the transient)
# An owner's pooled work runs in slices of this many values' worth of entries (rows x D): 2^29 is
# 2^19 entries at D = 1024, 1 GiB of bf16 rows on the device; the mean lookup at the paper's shape
# (2,048 tokens x 128 entries per rank, spread over the shards) is one slice.
OWNER_SLICE_ELEMENTS = 1 << 29


def owner_slice_rows(dim: int) -> int:
    """Entries (and rows) of one slice of an owner's pooled work for rows of `dim` values."""
    return max(1, OWNER_SLICE_ELEMENTS // dim)


def pooled_wire_bytes(tokens: list[int], K: int, M: int, D: int, wire_bytes: int, need_w: list[bool],
                      backward: bool, row_grads: bool) -> float:
    """Estimated bytes all M ranks put on the wire for one pooled lookup; `tokens[r]`, `need_w[r]`:
    rank r's token count and whether its weights want gradients. Per entry sent to a remote owner:
    id + token (8) + weight (4), and its weight gradient (4) back when wanted; per remote owner a
    rank sends entries to: the T x D partial sums back and, in backward, grad_y there (wire_bytes
    each). `auto` (ShardedValueTable.embedding_bag) and the memory plan both decide with it."""
    total = 0.0
    for T, w_grad in zip(tokens, need_w):
        w_grad = w_grad and backward
        grad_y = backward and (w_grad or row_grads)
        E, owners = T * K, min(T * K, M - 1)
        total += E * (M - 1) / M * (12 + wire_bytes * w_grad) + owners * T * wire_bytes * D * (1 + grad_y)
    return total


def rows_wire_bytes(tokens: list[int], K: int, M: int, N: int, D: int, value_bytes: int, backward: bool,
                    row_grads: bool) -> float:
    """Estimated bytes all M ranks put on the wire for one unique-row lookup of an N-row table: per
    remote unique row, id + count (16) out, the row back and, in backward, its fp32 gradient out.
    The unique count would need a sync (torch.unique), so it is estimated for uniformly spread
    ids, U = N (1 - exp(-T K / N)): an upper bound for skewed ids, which favours pooled there."""
    total = 0.0
    for T in tokens:
        U = N * -math.expm1(-T * K / N)
        total += U * (M - 1) / M * (16 + value_bytes * D + 4 * D * (row_grads and backward))
    return total


class _PooledLookup(torch.autograd.Function):
    """Owner-side pooling (TorchRec row-wise sharding, pooled output).

    forward: entries (local row id, token, weight) to their owners; each owner records the access
    counts, sums its rows into a T_j x D partial bag per requester j and sends it back; the
    requester adds the M partials in owner order, in fp32. backward: grad_y to the owners that
    received entries (the forward's splits); they compute the entries' weight gradients (sent
    back) and their rows' gradients, which stay where the rows live. Saved: ids, tokens,
    weights and the owner's sort, never rows."""

    @staticmethod
    def forward(ctx, table: "ShardedValueTable", route: _PooledRoute, w_TK: torch.Tensor,
                anchor: Optional[torch.Tensor]) -> torch.Tensor:
        T, D, wire = route.T, table.dim, route.wire
        with record_function("smft/exchange_fwd"):
            w_E = w_TK.reshape(-1).index_select(0, route.perm_E)
            meta_I2 = table._all_to_all(torch.stack([route.lid_E, route.tok_E], 1), route.recv, route.send, "fwd")
            w_I = table._all_to_all(w_E, route.recv, route.send, "fwd")
        with record_function("smft/bag"):
            lid_I = meta_I2[:, 0].long()
            # bag of each entry: requester j's tokens, numbered after those of the earlier
            # requesters that sent entries (arrival order: requester, then token)
            bag_I = meta_I2[:, 1].long()
            pos = bags = 0
            for n, t in zip(route.recv, route.tokens):
                if n:
                    bag_I[pos:pos + n] += bags
                    bags += t
                pos += n
            sort = None
            if route.records or (route.backward and table.trainable):
                lid_sorted_I, perm_I = torch.sort(lid_I, stable=True)
                uniq_U, cnt_U = torch.unique_consecutive(lid_sorted_I, return_counts=True)
                sort = (perm_I, uniq_U, cnt_U)
                if route.records:  # from every requester: the global c(i) of this shard's rows
                    table._counts.add(uniq_U, cnt_U, sorted_unique=True)
            with torch.autocast(w_TK.device.type, enabled=False):  # fp32 accumulation, whatever autocast says
                partial_BD = _owner_bags_in_slices(table, lid_I, bag_I, w_I, bags).to(wire)
        with record_function("smft/exchange_fwd"):
            parts = table._all_to_all(partial_BD, [T if n else 0 for n in route.send],
                                      [t if n else 0 for n, t in zip(route.recv, route.tokens)], "fwd")
        with record_function("smft/bag"):
            y_TD = torch.zeros(T, D, dtype=torch.float32, device=w_TK.device)
            for part_TD in parts.view(-1, T, D) if T else ():  # owner order: the same sum on every run
                y_TD += part_TD
        ctx.table, ctx.route, ctx.sort, ctx.wire, ctx.w_dtype = table, route, sort, wire, w_TK.dtype
        ctx.save_for_backward(lid_I, bag_I, w_I)
        return y_TD.to(w_TK.dtype)

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):
        table, route, M, D = ctx.table, ctx.route, ctx.table.mp_size, ctx.table.dim
        lid_I, bag_I, w_I = ctx.saved_tensors
        if not (table.trainable or any(route.need_w)):
            return None, None, None, None
        with record_function("smft/exchange_bwd"):
            owners = sum(1 for n in route.send if n)
            g_out = g_TD.to(ctx.wire).contiguous().expand(owners, route.T, D).reshape(-1, D)
            G_BD = table._all_to_all(g_out, [t if n else 0 for n, t in zip(route.recv, route.tokens)],
                                     [route.T if n else 0 for n in route.send], "bwd").float()
        with record_function("smft/bag"), torch.autocast(G_BD.device.type, enabled=False):
            if table.trainable:
                _keep_owner_row_grads(table, ctx.sort, bag_I, w_I, G_BD)
            gw_send = None
            if any(route.need_w):
                # offloaded: the entries' unique rows move again (autograd saves no rows), a slice at a time
                I = lid_I.numel()
                gw_I = torch.empty(I, dtype=torch.float32, device=G_BD.device)
                for s0 in range(0, I, table.owner_slice_rows):
                    s1 = min(s0 + table.owner_slice_rows, I)
                    rows_UD, read_S = table.unique_rows(lid_I[s0:s1])
                    for c0 in range(s0, s1, _DOT_CHUNK):
                        c1 = min(c0 + _DOT_CHUNK, s1)
                        rows = rows_UD.index_select(0, read_S[c0 - s0:c1 - s0]).float()
                        gw_I[c0:c1] = (G_BD.index_select(0, bag_I[c0:c1]) * rows).sum(1)
                chunks, pos = [], 0
                for n, want in zip(route.recv, route.need_w):
                    if want:
                        chunks.append(gw_I[pos:pos + n])
                    pos += n
                gw_send = torch.cat(chunks).to(ctx.wire)
        gw_TK = None
        if any(route.need_w):
            mine = route.need_w[table.mp_rank]
            with record_function("smft/exchange_bwd"):
                gw_E = table._all_to_all(gw_send, route.send if mine else [0] * M,
                                         [n if want else 0 for n, want in zip(route.recv, route.need_w)], "bwd")
            if mine and ctx.needs_input_grad[2]:
                gw_E = gw_E.to(ctx.w_dtype)
                gw_TK = torch.empty_like(gw_E).index_copy_(0, route.perm_E, gw_E).view(route.T, route.K)
        return None, None, gw_TK, None


def _owner_bag(weight_RD: torch.Tensor, lid_I: torch.Tensor, bag_I: torch.Tensor, w_I: torch.Tensor,
               bags: int) -> torch.Tensor:
    """-> partial_BD fp32: partial[b] = sum over entries e of bag b of w_I[e] * weight[lid_I[e]].
    bag_I is non-decreasing, so each bag is a contiguous run of entries (offsets, no scatter)."""
    if bags == 0:
        return torch.zeros(0, weight_RD.shape[1], dtype=torch.float32, device=weight_RD.device)
    offsets_B = torch.searchsorted(bag_I, torch.arange(bags, device=bag_I.device))
    if weight_RD.dtype == torch.float32:
        return F.embedding_bag(lid_I, weight_RD, offsets_B, per_sample_weights=w_I.float(), mode="sum")
    rows_ID = weight_RD.index_select(0, lid_I).float()  # fp32 accumulation of a bf16 shard
    return F.embedding_bag(torch.arange(lid_I.numel(), device=lid_I.device), rows_ID, offsets_B,
                           per_sample_weights=w_I.float(), mode="sum")


def _owner_bags_in_slices(table: "ShardedValueTable", lid_I: torch.Tensor, bag_I: torch.Tensor,
                          w_I: torch.Tensor, bags: int) -> torch.Tensor:
    """-> partial_BD fp32 (`_owner_bag`) of the I entries an owner received, their rows read by
    `ValueTable.unique_rows`, in slices of whole bags of at most `owner_slice_rows` + K entries (a
    slice ends where the bag holding its last allowed entry starts; a bag has at most K entries):
    the device holds one slice's rows (offloaded) and their fp32 copies (a bf16 shard), however
    many entries the lookup sent this shard. Each bag is summed by the same kernel over the same
    entries as in one piece: the same bits. One host read (the slices' bounds), only when it slices."""
    I, step = lid_I.numel(), table.owner_slice_rows
    if I <= step:
        rows_UD, read_I = table.unique_rows(lid_I)
        return _owner_bag(rows_UD, read_I, bag_I, w_I, bags)
    cut_bags = bag_I[step::step].contiguous()
    starts = torch.searchsorted(bag_I, cut_bags)  # the first entry of each cut's bag
    cuts = torch.stack([starts, cut_bags], 1).tolist()
    bounds = sorted({(0, 0), *map(tuple, cuts), (I, bags)})  # (entry, bag) pairs, ascending
    partial_BD = torch.empty(bags, table.dim, dtype=torch.float32, device=bag_I.device)
    for (e0, b0), (e1, b1) in zip(bounds, bounds[1:]):
        rows_UD, read_S = table.unique_rows(lid_I[e0:e1])
        partial_BD[b0:b1] = _owner_bag(rows_UD, read_S, bag_I[e0:e1] - b0, w_I[e0:e1], b1 - b0)
    return partial_BD


def _keep_owner_row_grads(table: "ShardedValueTable", sort, bag_I: torch.Tensor, w_I: torch.Tensor,
                          G_BD: torch.Tensor) -> None:
    """Keep (`ValueTable._keep_grad`) grad[r] = sum over entries e of row r of w_I[e] * G[bag_I[e]]
    for the rows `restrict_grad_to` allows, local ids sorted. Entries are grouped by row (the
    forward's sort), so each row is a run: one embedding_bag over G, no scatter, no row leaves this
    rank. Every touched row's bag is summed, then the allowed ones kept: one host read (their
    positions), where dropping the other rows' entries first would take a second (the number of
    entries kept). An offloaded owner does this for `owner_slice_rows` rows at a time and each
    slice's gradients leave the device at once (one more host read: the slices' entry bounds); a
    resident table keeps all of them on the device anyway, in one piece."""
    perm_I, uniq_U, cnt_U = sort
    U = uniq_U.numel()
    if U == 0:
        return
    bag_s, w_s = bag_I.index_select(0, perm_I), w_I.index_select(0, perm_I)
    offsets_U = cnt_U.cumsum(0) - cnt_U
    step = table.owner_slice_rows if table.offload == "host" else U
    bounds = [0, *offsets_U[step::step].tolist(), bag_s.numel()] if U > step else [0, bag_s.numel()]
    for k, (e0, e1) in enumerate(zip(bounds, bounds[1:])):
        rows = slice(k * step, min((k + 1) * step, U))
        ids_S = uniq_U[rows]
        grad_SD = F.embedding_bag(bag_s[e0:e1], G_BD, offsets_U[rows] - e0, per_sample_weights=w_s[e0:e1].float(),
                                  mode="sum")
        if table._grad_allowed is not None:
            # both sorted and unique: isin skips its `unique` of each
            kept = torch.isin(ids_S + table.row_start, table._grad_allowed, assume_unique=True).nonzero().squeeze(1)
            ids_S, grad_SD = ids_S.index_select(0, kept), grad_SD.index_select(0, kept)
        table._keep_grad(ids_S, grad_SD, sorted_unique=True)


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
                 device=None, exchange: str = "auto"):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
        mp_size = dist.get_world_size(group) if group is not None else 1
        mp_rank = dist.get_rank(group) if group is not None else 0
        plan = RowShardPlan(num_rows, mp_size)
        super().__init__(num_rows, dim, *plan.bounds(mp_rank), dtype=dtype, device=device)
        self.plan, self.mp_size, self.mp_rank = plan, mp_size, mp_rank
        self.group, self.replicate_group = group, replicate_group
        self.bytes_sent: Counter = Counter()
        self._route: Optional[_Route] = None
        self._synced = {"grad": 0, "counts": 0}  # entries of each accumulator already summed over replicas
        self.exchange = exchange  # "auto" | "pooled" | "rows" (docs/memory_exchange.md)
        self.last_exchange: Optional[str] = None  # what the latest lookup used ("pooled" or "rows")
        self._grad_anchor = torch.empty(0, device=device, requires_grad=True)  # see embedding_bag
        # [0, s_1, ..., s_{M-1}, N]: searchsorted(edges, id, right=True) - 1 is the owner of a valid id
        self._edges = torch.tensor([plan.bounds(r)[0] for r in range(mp_size)] + [num_rows], device=device)
        # How many received entries an owner's pooled lookup reads and bags at a time, and, offloaded,
        # how many rows' gradients its backward computes at a time: the device holds one slice's
        # rows (their fp32 copies for a bf16 shard) and row gradients, however skewed the lookup
        # (every rank's reads may land on one shard). Tests set it small to make slices.
        self.owner_slice_rows = owner_slice_rows(dim)

    @classmethod
    def from_context(cls, num_rows: int, dim: int, ctx, dtype: torch.dtype = torch.float32) -> "ShardedValueTable":
        """This rank's shard for a `smft_dist.distributed.DistContext`."""
        return cls(num_rows, dim, ctx.mp_group, ctx.replicate_group, dtype=dtype, device=ctx.device,
                   exchange=ctx.memory_exchange)

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

    def _bucket(self, ids_U: torch.Tensor, sorted_ids: bool):
        """-> (ids sorted, hence grouped by owner; the sorting permutation, None when `sorted_ids`
        says they already are, as torch.unique's; ids per owner (M,); out-of-range ids (scalar)).
        Device tensors: no sync."""
        perm_U = None
        if not sorted_ids:
            ids_U, perm_U = torch.sort(ids_U)
        pos = torch.searchsorted(ids_U, self._edges)  # where each shard's ids start, and N
        return ids_U, perm_U, pos[1:] - pos[:-1], pos[0] + (ids_U.numel() - pos[-1])

    def _out_of_range(self, ids: torch.Tensor) -> IndexError:
        """The error every rank raises when some rank's ids are out of range; it names this rank's
        (the error path may read them: the step is over)."""
        bad = ids[(ids < 0) | (ids >= self.num_rows)][:5].tolist()
        return IndexError(
            f"memory slot ids {bad or '(none on this rank; on another rank)'} are outside [0, {self.num_rows}) "
            "at the lookup: the model's memory_n_keys^2 must match the table's row count (check the checkpoint "
            "and the config)"
        )

    # ----- primitives -----
    def fetch(self, ids_U: torch.Tensor, counts_U: torch.Tensor, sorted_ids: bool = False,
              in_range: bool = False) -> torch.Tensor:
        """rows_UD = V[ids_U] for unique global ids; owners record counts_U. Collective. The ids are
        always checked (in_range is not needed: the check rides on the split sizes' one read)."""
        M = self.mp_size
        with record_function("smft/exchange_fwd"):
            # 1. distribute ids: split sizes (and out-of-range counts) first, then (id, count) pairs
            sorted_U, perm_U, send_M, bad = self._bucket(ids_U, sorted_ids)
            msg_M2 = torch.stack([send_M, bad.expand(M)], 1)
            both = torch.cat([msg_M2, self._exchange(msg_M2, "fwd")]).tolist()  # the one D2H copy
            if any(bad for _, bad in both[M:]):  # every rank raises, none waits in a collective
                raise self._out_of_range(ids_U)
            send_splits, recv_splits = [n for n, _ in both[:M]], [n for n, _ in both[M:]]
            req_U2 = torch.stack([sorted_U, _permute(counts_U, perm_U).to(torch.long)], dim=1)
            got_I2 = self._all_to_all(req_U2, recv_splits, send_splits, "fwd")
            local_I = got_I2[:, 0] - self.row_start
            # 2. local lookup; the counts arrive here from every requester: global c(i) of our rows
            if self.records_accesses():
                self._counts.add(local_I, got_I2[:, 1])
            rows_ID = self.read_rows(local_I)  # offloaded: the unique rows, one host gather + one copy
            # 3. distribute rows back, then undo the sort
            rows_UD = self._all_to_all(rows_ID, send_splits, recv_splits, "fwd")
            if perm_U is not None:
                rows_UD = torch.empty_like(rows_UD).index_copy_(0, perm_U, rows_UD)
        self._route = _Route(ids_U, perm_U, send_splits, recv_splits, local_I)
        return rows_UD

    def push_grad(self, ids_U: torch.Tensor, grad_UD: torch.Tensor, sorted_ids: bool = False) -> None:
        """Send row gradients of (a subset of) the fetched ids to their owners. Collective.
        (sorted_ids is not needed: an owner receives the ids of several requesters.)"""
        route = self._route
        reuse = route is not None and ids_U is route.ids_U
        M = self.mp_size
        with record_function("smft/exchange_bwd"):
            if reuse:
                perm_U = route.perm_U
                send_M = torch.tensor(route.send_splits, device=ids_U.device)
            else:
                _, perm_U, send_M, _ = self._bucket(ids_U, sorted_ids=False)
            # Agree on the route: each rank tells each owner its split size and whether it reuses the
            # forward route; the ids need to travel again only if some rank cannot reuse it.
            msg_M2 = torch.stack([send_M, torch.full_like(send_M, int(reuse))], 1)
            both = torch.cat([msg_M2, self._exchange(msg_M2, "bwd")]).tolist()  # the one D2H copy
            send_splits, recv_splits = [n for n, _ in both[:M]], [n for n, _ in both[M:]]
            if all(r for _, r in both[M:]):
                local_I = route.recv_local_I
            else:
                sorted_U = _permute(ids_U, perm_U)
                local_I = self._all_to_all(sorted_U, recv_splits, send_splits, "bwd") - self.row_start
            grad_ID = self._all_to_all(_permute(grad_UD, perm_U), recv_splits, send_splits, "bwd")
        self._keep_grad(local_I, grad_ID)

    # ----- the lookup: pooled at the owners, or the unique rows (docs/memory_exchange.md) -----
    def embedding_bag(self, idx_TK: torch.Tensor, w_TK: torch.Tensor, in_range: bool = False) -> torch.Tensor:
        """y_TD[t] = sum_k w_TK[t, k] * V[idx_TK[t, k]], like `ValueTable.embedding_bag`, by the
        exchange `self.exchange` names (auto: per step, the one its byte estimate favours). Collective.
        The ids are always checked (in_range is not needed: the check rides on the split sizes' read)."""
        if self.exchange == "rows":
            self.last_exchange = "rows"
            return super().embedding_bag(idx_TK, w_TK)
        need_w = torch.is_grad_enabled() and w_TK.requires_grad
        with record_function("smft/exchange_fwd"):
            route = self._pooled_route(idx_TK, need_w, w_TK.dtype)
        if self.exchange == "auto" and self._rows_bytes(route) < self._pooled_bytes(route):
            self.last_exchange = "rows"
            return super().embedding_bag(idx_TK, w_TK)
        self.last_exchange = "pooled"
        # With frozen weights (finetuning: query and keys frozen) the anchor still puts the lookup
        # in the graph, so that its backward computes the rows' gradients; it never gets a grad.
        anchor = self._grad_anchor if self.trainable and torch.is_grad_enabled() else None
        return _PooledLookup.apply(self, route, w_TK, anchor)

    def _pooled_route(self, idx_TK: torch.Tensor, need_w: bool, w_dtype: torch.dtype) -> _PooledRoute:
        """Bucket the T x K entries by owner and agree on the split sizes: one small all-to-all and
        ONE device-to-host copy. Out-of-range ids are counted, not looked up: every rank learns
        that some rank had one and all raise together (no rank is left waiting in a collective)."""
        T, K = idx_TK.shape
        M = self.mp_size
        ids_E = idx_TK.reshape(-1)
        # Under bf16 autocast the bag's consumers compute in bf16: its partials travel in bf16
        dev = idx_TK.device.type
        wire = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w_dtype
        # class 0: id < 0; 1..M: owner + 1; M + 1: id >= N
        cls_E = torch.searchsorted(self._edges, ids_E, right=True)
        cls_sorted_E, perm_E = torch.sort(cls_E, stable=True)  # grouped by owner, tokens in order within
        bounds = torch.searchsorted(cls_sorted_E, torch.arange(M + 3, device=ids_E.device))
        per_class = bounds[1:] - bounds[:-1]  # (M + 2,)
        send_M = per_class[1:M + 1]
        bad = per_class[0] + per_class[M + 1]
        msg_M4 = torch.stack([send_M, torch.full_like(send_M, T), bad.expand(M),
                              torch.full_like(send_M, int(need_w))], 1)
        got_M4 = self._exchange(msg_M4, "fwd")
        both = torch.cat([msg_M4, got_M4]).tolist()  # the one device-to-host copy of this exchange
        mine, theirs = both[:M], both[M:]
        if any(row[2] for row in theirs):  # every rank raises, none waits in a collective
            raise self._out_of_range(ids_E)
        # local row id of each entry at its owner (int32: a shard has < 2^31 rows), and its token
        starts_E = self._edges.index_select(0, (cls_sorted_E - 1).clamp_(0, M - 1))
        lid_E = (ids_E.index_select(0, perm_E) - starts_E).to(torch.int32)
        tok_E = torch.div(perm_E, K, rounding_mode="floor").to(torch.int32)
        return _PooledRoute(T=T, K=K, perm_E=perm_E, lid_E=lid_E, tok_E=tok_E,
                            send=[r[0] for r in mine], recv=[r[0] for r in theirs],
                            tokens=[r[1] for r in theirs], need_w=[bool(r[3]) for r in theirs], wire=wire,
                            records=self.records_accesses(), backward=torch.is_grad_enabled())

    def _pooled_bytes(self, route: _PooledRoute) -> float:
        return pooled_wire_bytes(route.tokens, route.K, self.mp_size, self.dim,
                                 torch.empty(0, dtype=route.wire).element_size(), route.need_w,
                                 route.backward, self.trainable)

    def _rows_bytes(self, route: _PooledRoute) -> float:
        return rows_wire_bytes(route.tokens, route.K, self.mp_size, self.num_rows, self.dim,
                               self.weight.element_size(), route.backward, self.trainable)

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
        dev = self.compute_device  # where the counts accumulate, and the collective runs
        for name, acc, trailing, dtype in (("grad", self._grad, (self.dim,), torch.float32),
                                           ("counts", self._counts, (), torch.long)):
            new = acc.split_off(self._synced[name])
            # an offloaded shard's gradients are on the host (`_keep_grad`): to the device for the
            # all-gather (counted "h2d"), and the gathered ones back to the host
            held = self.weight.device if name == "grad" else dev
            ids, vals = new.coalesce(trailing, dtype=dtype, device=held)
            if name == "grad" and self.offload == "host":
                self.moved_rows["h2d"] += ids.numel()
                self.moved_bytes["h2d"] += ids.numel() * (ids.element_size() + self.dim * vals.element_size())
            ids, vals = self._all_gather_padded(ids.to(dev), vals.to(dev))
            if name == "grad":
                self._keep_grad(ids, vals, scaled=True)  # each replica's sum was scaled as its entries arrived
            else:
                acc.add(ids, vals)
            self._synced[name] = len(acc)

    def _all_gather_padded(self, ids_U: torch.Tensor, vals_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate (ids, vals) of every replica. Pads to the longest: gloo's all_gather
        cannot take tensors of unequal sizes."""
        group, W = self.replicate_group, dist.get_world_size(self.replicate_group)
        sizes_W = ids_U.new_zeros(W)
        dist.all_gather_into_tensor(sizes_W, torch.full_like(sizes_W[:1], ids_U.numel()), group=group)
        sizes = sizes_W.tolist()  # the one device-to-host copy: the sizes pick the valid slices
        L = max(sizes)
        out = []
        for x in (ids_U, vals_U):
            pad = x.new_zeros((L, *x.shape[1:]))
            pad[:x.shape[0]] = x
            full = x.new_empty((W * L, *x.shape[1:]))
            dist.all_gather_into_tensor(full, pad, group=group)
            self.bytes_sent["sync"] += (W - 1) * pad.numel() * pad.element_size()
            out.append(torch.cat([full[w * L:w * L + n] for w, n in enumerate(sizes)]))
        return out[0], out[1]

    def zero_step(self) -> None:
        super().zero_step()
        self._route = None
        self._synced = {"grad": 0, "counts": 0}
