"""TF-IDF slot selection for sparse memory finetuning (docs/design.md §1.2)."""
from smft_dist.selection.background import BackgroundIndex, build_background_index
from smft_dist.selection.counts import global_total, local_counts, sync_replica_counts
from smft_dist.selection.tfidf import MODES, SelectionStats, select_for_model, select_top_t, tfidf_scores

__all__ = ["BackgroundIndex", "build_background_index", "global_total", "local_counts", "MODES",
           "SelectionStats", "select_for_model", "select_top_t", "sync_replica_counts", "tfidf_scores"]
