"""Optimizers for memory value tables (docs/design.md §1.3)."""
from smft_dist.optim.freeze import freeze_dense
from smft_dist.optim.row_state import RowState
from smft_dist.optim.rowwise import AdamRowwise, RowwiseAdagrad, build_memory_row_optimizer
from smft_dist.optim.sparse import (MaskedAdamW, MaskedSGD, RowSparseAdamW, RowSparseOptimizer,
                                    build_memory_optimizer, merge_state_dicts, selected_grad)

__all__ = ["freeze_dense", "RowState", "AdamRowwise", "RowwiseAdagrad", "build_memory_row_optimizer", "MaskedAdamW",
           "MaskedSGD", "RowSparseAdamW", "RowSparseOptimizer", "build_memory_optimizer", "merge_state_dicts",
           "selected_grad"]
