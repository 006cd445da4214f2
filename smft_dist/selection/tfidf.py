"""TF-IDF ranking of memory slots and the global top-t selection (docs/design.md §1.2, §2.4).

Shape legend: R' rows of this shard touched this step, t top_t, M memory-parallel group size.

    score(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1))      (only c(i) > 0 are candidates)

Each owner ranks its own touched rows and keeps its top t; one all-gather of the M x t (score,
slot, count) triples then decides the global top t. No N-long vector is built per step. Ties are
broken by the lowest slot id everywhere, so the set equals a single-process ranking exactly and
is identical on every rank (each rank filters the gradients it sends by it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from smft_dist.memory.values import ValueTable
from smft_dist.selection.background import BackgroundIndex
from smft_dist.selection.counts import all_gather_rows, all_reduce_max, all_reduce_sum, local_counts, sync_replica_counts, table_group

MODES = ("tfidf", "tf", "all")


@dataclass
class SelectionStats:
    """What one step's selection saw, for logging (global over the table)."""

    candidates: int  # rows with c > 0
    total: int  # sum_j c(j)
    selected: int  # rows selected
    selected_accesses: int  # sum of c over the selected rows

    @property
    def coverage(self) -> float:
        """Fraction of this step's accesses that land on selected rows."""
        return self.selected_accesses / max(self.total, 1)


def tfidf_scores(counts: torch.Tensor, total: int, df: Optional[torch.Tensor], num_background: int,
                 mode: str = "tfidf") -> torch.Tensor:
    """-> scores_R' float64 for rows with counts_R' (int) and background df_R' (int).

    mode "tfidf": c/total * log((|B|+1)/(df+1)); "tf" (ablation) and "all": c/total.
    float64 so that near-equal scores rarely tie by rounding; exact ties go to the lowest slot.
    """
    if mode not in MODES:
        raise ValueError(f"selection mode {mode!r} is not one of {list(MODES)} (selection.mode)")
    tf = counts.double() / max(int(total), 1)
    if mode != "tfidf":
        return tf
    if df is None:
        raise ValueError("selection.mode=tfidf needs a background df index: build one with "
                         "mode=background_index (or set selection.df_path), or use selection.mode=tf")
    return tf * torch.log((num_background + 1) / (df.double() + 1))


def _rank(triples_X3: torch.Tensor) -> torch.Tensor:
    """Order (score, slot, count) rows by (-score, slot): two stable sorts, slot first."""
    triples_X3 = triples_X3[torch.sort(triples_X3[:, 1], stable=True).indices]
    return triples_X3[torch.sort(triples_X3[:, 0], descending=True, stable=True).indices]


def select_top_t(table: ValueTable, df_index: Optional[BackgroundIndex], top_t: int,
                 mode: str = "tfidf") -> tuple[torch.Tensor, SelectionStats]:
    """-> (selected global ids sorted int64, stats): the top-t rows of this step by `mode`.

    Call after the forward (the counts are this step's) and before the backward; with replicas,
    after `sync_replica_counts` (`select_for_model` does both). Collective over the table's
    memory-parallel group; returns the same ids on every rank. With mode "all", every touched row
    is selected.
    """
    if top_t < 1:
        raise ValueError(f"selection.top_t={top_t} must be >= 1")
    if mode == "tfidf" and df_index is not None and (df_index.row_start, df_index.row_end, df_index.num_slots) != (
            table.row_start, table.row_end, table.num_rows):
        raise ValueError(f"df index covers rows [{df_index.row_start}, {df_index.row_end}) of {df_index.num_slots}, "
                         f"the table [{table.row_start}, {table.row_end}) of {table.num_rows}: load it with "
                         "BackgroundIndex.load(path, table) after sharding the model")
    group = table_group(table)
    ids_R, counts_R = local_counts(table)
    device = ids_R.device
    total, candidates = all_reduce_sum([int(counts_R.sum()), ids_R.numel()], group, device)
    df_R = df_index.lookup(ids_R) if (mode == "tfidf" and df_index is not None) else None
    scores_R = tfidf_scores(counts_R, total, df_R, df_index.num_batches if df_index else 0, mode)

    if mode == "all":
        width = all_reduce_max(ids_R.numel(), group, device)  # pad to the largest shard's
    else:
        width = top_t
        if scores_R.numel() > top_t:
            # Keep rows scoring at least the t-th best (ties included) before the sort: a partial
            # top-k is ~10x cheaper than sorting every touched row.
            keep = scores_R >= torch.topk(scores_R, top_t, sorted=False).values.min()
            ids_R, counts_R, scores_R = ids_R[keep], counts_R[keep], scores_R[keep]
    # Local candidates by (-score, slot): ids_R is sorted, so a stable sort keeps low slots first.
    order = torch.sort(scores_R, descending=True, stable=True).indices[:width]
    # float64 holds slot ids and counts exactly (< 2^53); one tensor = one all-gather.
    local_X3 = torch.stack([scores_R[order], ids_R[order].double(), counts_R[order].double()], dim=1)
    pad = torch.tensor([[-float("inf"), float(table.num_rows), 0.0]], dtype=torch.float64, device=device)
    local_W3 = torch.cat([local_X3, pad.expand(width - local_X3.shape[0], 3)])
    all_W3 = local_W3 if group is None else all_gather_rows(local_W3, group)
    real = _rank(all_W3[all_W3[:, 1] < table.num_rows])
    chosen = real if mode == "all" else real[:top_t]
    selected = torch.sort(chosen[:, 1].long()).values
    stats = SelectionStats(candidates, total, selected.numel(), int(chosen[:, 2].sum()))
    return selected, stats


def select_for_model(tables: Sequence[ValueTable], df_indexes: Optional[Sequence[Optional[BackgroundIndex]]],
                     selection_cfg) -> tuple[list[torch.Tensor], list[SelectionStats]]:
    """Select the trainable rows of every memory table for this step and restrict the coming
    backward to them (only their gradients travel). Call once per step, after the forward. `selection_cfg`: `SelectionConfig` (top_t,
    mode). -> (selected global ids per table, stats per table)."""
    df_indexes = list(df_indexes) if df_indexes is not None else [None] * len(tables)
    if len(df_indexes) != len(tables):
        raise ValueError(f"{len(df_indexes)} df indexes for {len(tables)} memory tables: build one per memory layer")
    selected, stats = [], []
    for table, df_index in zip(tables, df_indexes):
        sync_replica_counts(table)
        ids, st = select_top_t(table, df_index, selection_cfg.top_t, selection_cfg.mode)
        table.restrict_grad_to(ids)
        selected.append(ids)
        stats.append(st)
    return selected, stats
