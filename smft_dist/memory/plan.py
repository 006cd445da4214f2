"""Row-wise block partition of the memory value table over the memory-parallel (mp) group.

Worked example, ``RowShardPlan(num_rows=7, mp_size=2)``::

    rank 0 owns rows [0, 4)   (7 % 2 = 1 rank gets one extra row: the first one)
    rank 1 owns rows [4, 7)
    owner_of(tensor([6, 0, 3, 4])) -> tensor([1, 0, 0, 1])

And 49 rows over 3 ranks: [0, 17), [17, 33), [33, 49).

Balanced blocks (sizes differ by at most one) rather than TorchRec's ceil blocks, so that no rank
is left with a much smaller shard (ceil(49 / 3) = 17 gives 17, 17, 15; ceil(7 / 4) = 2 would give
2, 2, 2, 1 and, for 5 rows over 4 ranks, an empty last shard).
"""
from __future__ import annotations

import torch


class RowShardPlan:
    """Which contiguous block of rows each of `mp_size` ranks owns. O(1) state, no N-long tensors."""

    def __init__(self, num_rows: int, mp_size: int):
        if mp_size < 1:
            raise ValueError(f"mp_size={mp_size} must be >= 1")
        if num_rows < mp_size:
            raise ValueError(
                f"cannot shard {num_rows} rows over {mp_size} memory-parallel ranks (a rank would own no row): "
                "use fewer ranks (dist.mp) or more slots (model.memory_n_keys)"
            )
        self.num_rows, self.mp_size = num_rows, mp_size
        self.base, self.extra = divmod(num_rows, mp_size)  # ranks < extra own base + 1 rows
        self._split = self.extra * (self.base + 1)  # first row owned by a rank of size `base`

    def bounds(self, rank: int) -> tuple[int, int]:
        """-> [row_start, row_end) owned by `rank`."""
        if not 0 <= rank < self.mp_size:
            raise ValueError(f"rank {rank} outside [0, {self.mp_size})")
        start = rank * self.base + min(rank, self.extra)
        return start, start + self.base + (rank < self.extra)

    def sizes(self) -> list[int]:
        return [self.base + (r < self.extra) for r in range(self.mp_size)]

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Owner rank of each global row id (same shape, int64). Ids must be in [0, num_rows)."""
        big = torch.div(ids, self.base + 1, rounding_mode="floor")
        small = self.extra + torch.div(ids - self._split, self.base, rounding_mode="floor")
        return torch.where(ids < self._split, big, small)

    def __repr__(self) -> str:
        return f"RowShardPlan(num_rows={self.num_rows}, mp_size={self.mp_size}, sizes={self.sizes()})"
