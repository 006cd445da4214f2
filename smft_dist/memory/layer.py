"""The product-key memory layer that replaces an FFN (docs/design.md §1.1).

Shape legend: B batch, S sequence, C model dim, T valid (non-padding) tokens, H heads, K knn,
D value dim.

    output = W2( y ⊙ silu(W1 x) ),   y = sum_{h,k} softmax_k(score_hk) * V[slot_hk]

The value table is an object with the `ValueTable` interface: a `LocalValueTable` in one process,
a `ShardedValueTable` (row-sharded, sparse all-to-all) under `torch.distributed`. The layer holds
no collectives; swapping the table is all that distribution changes here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from smft_dist.memory.product_keys import ProductKeys, softmax_weights
from smft_dist.memory.values import DTYPES, LocalValueTable, ValueTable


class ProductKeyMemory(nn.Module):
    """forward(x_BSC) -> out_BSC. Set `token_mask` (B x S bool, True = real token) before a
    forward to keep padding positions out of the lookup: they make no accesses and get only the
    gated zero contribution."""

    def __init__(self, dim: int, n_keys: int, heads: int, knn: int, k_dim: int, value_dim: int,
                 swilu: bool = True, qk_norm: bool = False, value_dtype: str = "float32"):
        super().__init__()
        self.num_slots, self.value_dim, self.swilu = n_keys * n_keys, value_dim, swilu
        self.keys = ProductKeys(dim, n_keys, heads, knn, k_dim, qk_norm)
        self.values: ValueTable = LocalValueTable(self.num_slots, value_dim, dtype=DTYPES[value_dtype])
        self.values.reset_parameters()
        self.w1 = nn.Linear(dim, value_dim, bias=False) if swilu else None
        self.w2 = nn.Linear(value_dim, dim, bias=False)
        self.token_mask: Optional[torch.Tensor] = None

    def set_value_table(self, table: ValueTable, register: bool = True) -> None:
        """Swap in another table. `register=False` keeps it out of `parameters()`/`state_dict()`
        so that a dense engine (DeepSpeed, FSDP) never broadcasts, reduces or gathers it."""
        if table.num_rows != self.num_slots or table.dim != self.value_dim:
            raise ValueError(f"table is {table.num_rows} x {table.dim}, layer needs {self.num_slots} x {self.value_dim}")
        self._modules.pop("values", None)
        if register:
            self.values = table
        else:
            object.__setattr__(self, "values", table)

    def forward(self, x_BSC: torch.Tensor) -> torch.Tensor:
        B, S, C = x_BSC.shape
        x_NC = x_BSC.reshape(B * S, C)
        pos_T = None
        if self.token_mask is not None:
            # positions of the real tokens (with a KV cache, the mask's last S): one nonzero, used to
            # gather the inputs and to scatter the outputs back
            pos_T = self.token_mask[:, -S:].reshape(-1).nonzero().squeeze(1)
            x_TC = x_NC.index_select(0, pos_T)
        else:
            x_TC = x_NC
        slots_THK, scores_THK = self.keys(x_TC)
        # The weights (fp32, as the scores) in the run's compute dtype, as the layers around the bag:
        # autocast's, or the module's own where an engine casts it (DeepSpeed bf16 runs without autocast).
        dev = x_BSC.device.type
        w_THK = softmax_weights(scores_THK).to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                                               else x_BSC.dtype)
        # flatten: T may be 0. in_range: product keys give ids < n_keys^2, the table's rows (set_value_table)
        y_TD = self.values.embedding_bag(slots_THK.flatten(1), w_THK.flatten(1), in_range=True)
        if pos_T is not None:
            y_TD = y_TD.new_zeros(B * S, self.value_dim).index_copy(0, pos_T, y_TD)
        if self.swilu:
            y_TD = y_TD * F.silu(self.w1(x_NC))
        return self.w2(y_TD).view(B, S, C)
