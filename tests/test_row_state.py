"""`RowState`'s buffers stop growing at the shard's rows, grow one buffer at a time, and hold what
the memory plan (`row_state_bytes`) says: real tensors, watched at each allocation."""
import weakref

import torch

from smft_dist.memory.values import LocalValueTable
from smft_dist.model.memory_plan import row_state_bytes
from smft_dist.optim import RowSparseAdamW
from smft_dist.optim.row_state import RowState


class PeakBytes:
    """The most bytes of a RowState's buffers (row ids and state) alive at once, counted each time
    its growth allocates one (`RowState._grown`, the only allocation of a growth). A buffer counts
    until its tensor is freed, whether or not the state still holds it."""

    def __init__(self, state: RowState):
        self.alive: dict[int, int] = {}
        for buf in (state._rows_S, *state._bufs.values()):
            self._track(buf)
        self.peak = self.now()
        grown = state._grown

        def watched(buf, cap):
            out = grown(buf, cap)
            self._track(out)
            self.peak = max(self.peak, self.now())
            return out

        state._grown = watched

    def _track(self, buf: torch.Tensor) -> None:
        self.alive[id(buf)] = buf.numel() * buf.element_size()
        weakref.finalize(buf, self.alive.pop, id(buf))

    def now(self) -> int:
        return sum(self.alive.values())


def buffer_bytes(state: RowState) -> int:
    return sum(t.numel() * t.element_size() for t in (state._rows_S, *state._bufs.values()))


def _adamw_state(rows: int, dim: int = 6) -> RowState:
    """AdamW's row state (two fp32 moments, an int64 step) for a shard of `rows` rows."""
    return RowSparseAdamW([LocalValueTable(rows, dim)], 1e-3).states[0]


def _give_state(state: RowState, rows_U: torch.Tensor) -> None:
    """Rows get state as an optimizer step gives it (`slots`), with values to check later."""
    slots = state.slots(rows_U)
    state["exp_avg"][slots] = rows_U[:, None].float()


def test_capacity_stops_at_the_shards_rows():
    # 1000 rows, not a power of two: doubling from 64 would reach 1024 once 513 rows have state
    R = 1000
    state = _adamw_state(R)
    order = torch.randperm(R, generator=torch.Generator().manual_seed(0))
    for start, stop in ((0, 510), (510, 520), (520, 905), (905, R)):  # past 50%, past 90%, every row
        _give_state(state, order[start:stop])
        capacity = state._rows_S.shape[0]
        assert len(state) == stop and stop <= capacity <= R and capacity < 2 * stop
        assert all(buf.shape[0] == state._rows_S.shape[0] for buf in state._bufs.values())
    # growing kept every row's state: row r's moment holds r
    slots = state.slots(torch.arange(R))
    assert torch.equal(state["exp_avg"][slots], torch.arange(R, dtype=torch.float32)[:, None].expand(R, 6))


def test_growth_peak_is_the_new_capacity_plus_one_old_buffer_as_planned():
    # rows gain state 3 at a time: the last growth (512 -> 1000 slots) starts from the largest old
    # capacity, the case the plan bounds; every figure is exact integer byte arithmetic
    R, dim = 1000, 6
    state = _adamw_state(R, dim)
    peak = PeakBytes(state)
    for start in range(0, R, 3):
        _give_state(state, torch.arange(start, min(start + 3, R)))
    kept, growth = row_state_bytes(state.specs, R, R)
    largest_row = dim * 4  # an fp32 moment: the largest buffer per slot
    assert peak.peak - buffer_bytes(state) == growth == 512 * largest_row
    slot_map = R * 4
    assert buffer_bytes(state) + slot_map == kept == R * (2 * dim * 4 + 8 + 8) + slot_map
