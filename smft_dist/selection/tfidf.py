"""TF-IDF ranking of memory slots and the global top-t selection (docs/design.md §1.2, §2.4).

Shape legend: R' rows of this shard touched this step, t top_t, M memory-parallel group size.

    score(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1))      (only c(i) > 0 are candidates)

Each owner ranks its own touched rows and keeps its top t; one all-gather of the M x t (score,
slot, count) triples then decides the global top t. No N-long vector is built per step. Ties are
broken by the lowest slot id everywhere, so the set equals a single-process ranking exactly and
is identical on every rank (each rank filters the gradients it sends by it).

With an input-dependent t (selection.top_t=auto) the step keeps the fewest ranked rows whose score
mass reaches a share of every candidate's (`auto_t`), at most t_max: the top-t_max all-gather above,
one more integer in the all-reduce, and one read of the chosen t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from smft_dist.memory.values import ValueTable
from smft_dist.selection.background import BackgroundIndex
from smft_dist.selection.counts import (all_gather_rows, all_reduce_max, all_reduce_sum_tensor, local_counts,
                                        sync_replica_counts, table_group)

MODES = ("tfidf", "tf", "all")
# Fixed-point scale of the idf in the auto-t mass (units of 2^-20 ~ 1e-6 of a log factor): the mass is
# summed over ranks in int64, so its total, and the t it picks, cannot depend on the order of the sum
# (the rank count). Exact while the step's accesses x log((|B|+1)) x 2^20 stays below 2^63 (> 10^11
# accesses at |B| = 10^6), and each row's mass below 2^53 (it travels as a float64 beside the score).
IDF_UNITS = 2 ** 20


@dataclass
class SelectionStats:
    """What one step's selection saw, for logging (global over the table). The sums stay 0-dim
    int64 device tensors (reading them would make the host wait for the device mid-step): read
    them with int() once the step is done."""

    candidates: torch.Tensor  # rows with c > 0
    total: torch.Tensor  # sum_j c(j)
    selected: int  # rows selected
    selected_accesses: torch.Tensor  # sum of c over the selected rows

    @property
    def coverage(self) -> float:
        """Fraction of this step's accesses that land on selected rows."""
        return int(self.selected_accesses) / max(int(self.total), 1)


def tfidf_scores(counts: torch.Tensor, total: int | torch.Tensor, df: Optional[torch.Tensor], num_background: int,
                 mode: str = "tfidf") -> torch.Tensor:
    """-> scores_R' float64 for rows with counts_R' (int) and background df_R' (int); `total` a
    number or a 0-dim tensor (the same division either way).

    mode "tfidf": c/total * log((|B|+1)/(df+1)); "tf" (ablation) and "all": c/total.
    float64 so that near-equal scores rarely tie by rounding; exact ties go to the lowest slot.
    """
    if mode not in MODES:
        raise ValueError(f"selection mode {mode!r} is not one of {list(MODES)} (selection.mode)")
    tf = counts.double() / (total.clamp(min=1) if isinstance(total, torch.Tensor) else max(int(total), 1))
    if mode != "tfidf":
        return tf
    return tf * _idf(df, num_background)


def _idf(df: Optional[torch.Tensor], num_background: int) -> torch.Tensor:
    """-> float64 log((|B|+1)/(df+1)) of df_R' (int)."""
    if df is None:
        raise ValueError("selection.mode=tfidf needs a background df index: build one with "
                         "mode=background_index (or set selection.df_path), or use selection.mode=tf")
    return torch.log((num_background + 1) / (df.double() + 1))


def mass_units(counts: torch.Tensor, df: Optional[torch.Tensor], num_background: int, mode: str) -> torch.Tensor:
    """-> int64 mass_R' of rows with counts_R' and df_R': each row's score x sum_j c(j), in fixed
    point: c(i) x round(idf(i) x IDF_UNITS) for tfidf, c(i) for tf. Integers, so any split over ranks
    sums to the same total; the division by sum_j c(j) is common to every row and left out."""
    if mode == "tf":
        return counts.long()
    return counts.long() * torch.round(_idf(df, num_background) * IDF_UNITS).long()


def auto_t(ranked_WC: torch.Tensor, mass_total: torch.Tensor, share: float, t_max: int, num_rows: int) -> int:
    """-> the smallest t whose first t ranked rows hold >= `share` of `mass_total` (0-dim int64, the
    step's summed `mass_units`), at most t_max and the real rows. ranked_WC: rows (score, slot,
    count, mass) by (-score, slot), padding (slot num_rows, mass 0) last. Reads t: the host's one wait."""
    prefix_W = ranked_WC[:, 3].long().cumsum(0)
    need = torch.ceil(mass_total.double() * share).long()
    short_of_share = (prefix_W < need).sum()  # prefixes below the share (the prefix only grows)
    real = (ranked_WC[:, 1] < num_rows).sum()
    return int(torch.minimum(short_of_share + 1, real).clamp(max=t_max))


def _rank(triples_X3: torch.Tensor) -> torch.Tensor:
    """Order (score, slot, count) rows by (-score, slot): two stable sorts, slot first."""
    triples_X3 = triples_X3[torch.sort(triples_X3[:, 1], stable=True).indices]
    return triples_X3[torch.sort(triples_X3[:, 0], descending=True, stable=True).indices]


def _local_top(scores_R: torch.Tensor, ids_R: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (indices_2k into the R' rows, their scores_2k): the first k rows by (-score, slot) are
    among them, every other entry scores -inf. Fixed size, so the host never waits for the device.

    A partial top-k is ~10x cheaper than sorting every touched row, but it breaks ties at the k-th
    score v arbitrarily. Every row scoring above v is in topk (fewer than k do); of the rows
    scoring exactly v, a second topk on the slot (over the tied rows only) gives the k lowest
    slots. The tied rows of the first topk are voided (the second list has the right ones), as are
    non-tied rows filling the second list when fewer than k rows tie."""
    top = torch.topk(scores_R, k, sorted=False)
    v = top.values.min()
    tied_slot_R = torch.where(scores_R == v, ids_R, torch.iinfo(ids_R.dtype).max)
    lowest_tied = torch.topk(tied_slot_R, k, largest=False, sorted=True).indices
    indices_2k = torch.cat([top.indices, lowest_tied])
    valid_2k = torch.cat([top.values > v, scores_R[lowest_tied] == v])
    return indices_2k, torch.where(valid_2k, scores_R[indices_2k], -float("inf"))


def select_top_t(table: ValueTable, df_index: Optional[BackgroundIndex], top_t: int,
                 mode: str = "tfidf", auto_mass: Optional[float] = None) -> tuple[torch.Tensor, SelectionStats]:
    """-> (selected global ids sorted int64, stats): the top-t rows of this step by `mode`. With
    `auto_mass` (selection.top_t=auto) t is chosen per step, at most `top_t`: the fewest top rows
    whose scores sum to at least that share of every candidate's score (`auto_t`).

    Call after the forward (the counts are this step's) and before the backward; with replicas,
    after `sync_replica_counts` (`select_for_model` does both). Collective over the table's
    memory-parallel group; returns the same ids on every rank. With mode "all", every touched row
    is selected.
    """
    if top_t < 1:
        raise ValueError(f"selection.top_t={top_t} must be >= 1")
    if auto_mass is not None and (mode == "all" or not 0 < auto_mass <= 1):
        raise ValueError(f"selection.auto_mass={auto_mass} needs mode tfidf or tf (not {mode}) and a share in (0, 1]")
    if mode == "tfidf" and df_index is not None and (df_index.row_start, df_index.row_end, df_index.num_slots) != (
            table.row_start, table.row_end, table.num_rows):
        raise ValueError(f"df index covers rows [{df_index.row_start}, {df_index.row_end}) of {df_index.num_slots}, "
                         f"the table [{table.row_start}, {table.row_end}) of {table.num_rows}: load it with "
                         "BackgroundIndex.load(path, table) after sharding the model")
    group = table_group(table)
    ids_R, counts_R = local_counts(table)
    device = ids_R.device
    df_R = df_index.lookup(ids_R) if (mode == "tfidf" and df_index is not None) else None
    num_background = df_index.num_batches if df_index else 0
    auto = auto_mass is not None
    mass_R = mass_units(counts_R, df_R, num_background, mode) if auto else None
    # sum_j c(j) and the touched rows (read only for the log), and under auto the step's score mass,
    # summed over the group on the device
    sums = [counts_R.sum(), torch.full((), ids_R.numel(), dtype=torch.long, device=device)]
    reduced = all_reduce_sum_tensor(torch.stack(sums + [mass_R.sum()] if auto else sums), group)
    total, candidates = reduced[0], reduced[1]
    scores_R = tfidf_scores(counts_R, total, df_R, num_background, mode)

    if mode == "all":
        width = all_reduce_max(ids_R.numel(), group, device)  # pad to the largest shard's
    else:
        width = top_t
        if scores_R.numel() > top_t:
            keep, scores_R = _local_top(scores_R, ids_R, top_t)
            ids_R, counts_R = ids_R[keep], counts_R[keep]
            mass_R = mass_R[keep] if auto else None
    # Local candidates by (-score, slot): ids_R is sorted, so a stable sort keeps low slots first
    # (the rows tied at _local_top's k-th score come sorted by slot; the others all make the cut,
    # their order does not matter: `_rank` orders the gathered rows again).
    order = torch.sort(scores_R, descending=True, stable=True).indices[:width]
    local_real = order.numel()
    # float64 holds slot ids, counts and masses exactly (< 2^53); one tensor = one all-gather.
    # Columns: score, slot, count, and under auto the row's mass units.
    columns = [scores_R[order], ids_R[order].double(), counts_R[order].double()]
    local_XC = torch.stack(columns + [mass_R[order].double()] if auto else columns, dim=1)
    pad = [-float("inf"), float(table.num_rows), 0.0, 0.0][:local_XC.shape[1]]
    pad_1C = torch.stack([torch.full((), v, dtype=torch.float64, device=device) for v in pad])[None]
    local_WC = torch.cat([local_XC, pad_1C.expand(width - local_XC.shape[0], -1)])
    all_WC = local_WC if group is None else all_gather_rows(local_WC, group)
    ranked_WC = _rank(all_WC)
    # Padding rows rank last (score -inf, slot num_rows): how many real rows lead is the one number
    # the host must read (the selection's size), known without a read on one process; under auto
    # the read of t replaces it (so one process reads once more than with a fixed t).
    if auto:
        n = auto_t(ranked_WC, reduced[2], auto_mass, top_t, table.num_rows)
    else:
        real = local_real if group is None else int((all_WC[:, 1] < table.num_rows).sum())
        n = real if mode == "all" else min(top_t, real)
    chosen = ranked_WC[:n]
    selected = torch.sort(chosen[:, 1].long()).values
    stats = SelectionStats(candidates, total, selected.numel(), chosen[:, 2].sum().long())
    return selected, stats


def select_for_model(tables: Sequence[ValueTable], df_indexes: Optional[Sequence[Optional[BackgroundIndex]]],
                     selection_cfg) -> tuple[list[torch.Tensor], list[SelectionStats]]:
    """Select the trainable rows of every memory table for this step and restrict the coming
    backward to them (only their gradients travel). Call once per step, after the forward.
    `selection_cfg`: `SelectionConfig` (top_t, mode; under top_t=auto, auto_mass and top_t_max).
    -> (selected global ids per table, stats per table)."""
    df_indexes = list(df_indexes) if df_indexes is not None else [None] * len(tables)
    if len(df_indexes) != len(tables):
        raise ValueError(f"{len(df_indexes)} df indexes for {len(tables)} memory tables: build one per memory layer")
    selected, stats = [], []
    auto = selection_cfg.top_t == "auto"
    t, auto_mass = (selection_cfg.top_t_max, selection_cfg.auto_mass) if auto else (selection_cfg.top_t, None)
    with torch.profiler.record_function("smft/selection"):
        for table, df_index in zip(tables, df_indexes):
            sync_replica_counts(table)
            ids, st = select_top_t(table, df_index, t, selection_cfg.mode, auto_mass)
            table.restrict_grad_to(ids)
            selected.append(ids)
            stats.append(st)
    return selected, stats
