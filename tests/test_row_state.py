"""The two row-state layouts (smft_dist/optim/row_state.py). `RowState` (sparse finetuning): its
buffers stop growing at the shard's rows, grow one buffer at a time, and hold what the memory plan
(`row_state_bytes`) says: real tensors, watched at each allocation. `DenseRowState` (pretraining):
bitwise the growing layout's weights and state, no allocation after its construction, and
checkpoints that load across layouts and shard counts."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from smft_dist.checkpoint.layout import load_memory, load_memory_optimizer, save_memory, save_row_state
from smft_dist.memory.values import LocalValueTable, ValueTable
from smft_dist.model.memory_plan import row_state_bytes
from smft_dist.optim import AdamRowwise, MaskedAdamW, RowSparseAdamW, RowwiseAdagrad, merge_state_dicts
from smft_dist.optim.row_state import DenseRowState, RowState


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


def dense_state_bytes(state: DenseRowState) -> int:
    """The bytes of every tensor a `DenseRowState` holds: its state and its mark of the rows updated."""
    tensors = [*state._bufs.values(), *(t for t in vars(state).values() if isinstance(t, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors)


def _adamw_state(rows: int, dim: int = 6) -> RowState:
    """Growing AdamW row state (two fp32 moments, an int64 step) for a shard of `rows` rows, as
    sparse finetuning's `MaskedAdamW` keeps it."""
    return MaskedAdamW([LocalValueTable(rows, dim)], 1e-3).states[0]


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


def test_claim_appends_new_rows_in_order_and_names_them():
    """A mix of rows with and without state: the known keep their slots, the new get the next slots
    in the order given, and `claim` names exactly those new rows (the bf16 master copy is made
    from them)."""
    state = _adamw_state(100)
    assert state.slots(torch.tensor([7, 3])).tolist() == [0, 1]
    slots, new_N = state.claim(torch.tensor([3, 50, 7, 9]))
    assert slots.tolist() == [1, 2, 0, 3] and new_N.tolist() == [1, 3] and len(state) == 4
    slots, new_N = state.claim(torch.tensor([9, 3]))
    assert slots.tolist() == [3, 1] and new_N.numel() == 0


# ----- DenseRowState: pretraining's layout against the growing one -----
R, DIM, STEPS = 40, 8, 5
DENSE_OPTIMIZERS = {"adamw": RowSparseAdamW, "rowwise_adagrad": RowwiseAdagrad, "adam_rowwise": AdamRowwise}


def row_optimizer(name: str, tables, layout: type):
    """`name`'s optimizer of `tables` (lr 0.03, its other defaults) keeping its state in `layout`."""
    cls = DENSE_OPTIMIZERS[name]
    return type(f"{layout.__name__}{cls.__name__}", (cls,), {"row_state_class": layout})(tables, 0.03)


class Shard(ValueTable):
    """Rows [row_start, row_end) of an R x DIM table, given their row gradients by global id (what an
    owner holds once the exchange has delivered them)."""

    def push_grad(self, ids_U, grad_UD, sorted_ids=False):
        self._grad.add(ids_U - self.row_start, grad_UD)


def shards(bounds, value_dtype) -> list[Shard]:
    """The shards [lo, hi) of one table drawn from a fixed seed (equal rows whatever the bounds)."""
    out = [Shard(R, DIM, lo, hi, dtype=value_dtype) for lo, hi in bounds]
    for s in out:
        s.reset_parameters(torch.Generator().manual_seed(0))
    return out


def push_step(tables, step: int) -> int:
    """Step `step`'s row gradients to each shard: 8 + 3 x step distinct random rows (new rows join at
    every step, others rest a step), gradients ~N(0, 1). -> the number of rows."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randperm(R, generator=g)[:8 + 3 * step]
    grad = torch.randn(len(ids), DIM, generator=g)
    for t in tables:
        mine = t.owns(ids)
        t.zero_step()
        t.push_grad(ids[mine], grad[mine])
    return len(ids)


def run(tables, opts, steps) -> None:
    for step in steps:
        push_step(tables, step)
        for opt in opts:
            opt.step()


def sorted_state(opts) -> dict:
    """Every shard's state dict merged, sorted by global id."""
    sd = merge_state_dicts([o.state_dict() for o in opts])["tables"][0]
    return {k: v[torch.argsort(sd["ids"])] for k, v in sd.items()}


def assert_same(tables_a, opts_a, tables_b, opts_b) -> None:
    assert torch.equal(torch.cat([t.weight for t in tables_a]), torch.cat([t.weight for t in tables_b]))
    state_a, state_b = sorted_state(opts_a), sorted_state(opts_b)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k


@pytest.mark.parametrize("name", DENSE_OPTIMIZERS)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_layout_gives_bitwise_the_growing_layouts_weights_and_state(name, value_dtype):
    """Both layouts read and write the same rows' state by the same elementwise ops, so after every
    step the weights and the state of the rows with state are bitwise equal: only the place of a
    row's state differs (its slot, or its row). bf16: the master starts from the stored row at a
    row's first update in both (the dense layout knows that update by its step count or its mark)."""
    (growing,), (dense,) = shards([(0, R)], value_dtype), shards([(0, R)], value_dtype)
    growing_opt, dense_opt = row_optimizer(name, [growing], RowState), row_optimizer(name, [dense], DenseRowState)
    assert isinstance(dense_opt.states[0], DenseRowState) and isinstance(growing_opt.states[0], RowState)
    for step in range(STEPS):
        run([growing, dense], [growing_opt, dense_opt], [step])
        assert_same([growing], [growing_opt], [dense], [dense_opt])
    assert len(dense_opt.states[0]) == len(growing_opt.states[0]) < R  # some rows never updated: no state
    assert ("master" in dense_opt.states[0].specs) == (value_dtype == torch.bfloat16)


class _Allocations(TorchDispatchMode):
    """The leading sizes of the new tensors ops allocate (not in-place results or views: those
    share an input's storage)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.rows += [o.shape[0] for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.dim()
                      and o.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("name", DENSE_OPTIMIZERS)
@pytest.mark.parametrize("layout", [DenseRowState, RowState])
def test_dense_state_allocates_nothing_beyond_its_construction(name, layout):
    """Over 5 steps (bf16: master state too) every tensor a step allocates has at most as many rows
    as that step updates: the state is all there from the start. The growing layout, the same run,
    allocates buffers of its next capacity as rows join (64 slots, more than any step's rows)."""
    (table,) = shards([(0, R)], torch.bfloat16)
    opt = row_optimizer(name, [table], layout)
    buffers = {k: v.data_ptr() for k, v in opt.states[0]._bufs.items()}
    larger = []  # (step rows, rows of a larger allocation)
    for step in range(STEPS):
        n = push_step([table], step)
        with _Allocations() as allocations:
            opt.step()
        larger += [(n, rows) for rows in allocations.rows if rows > n]
    if layout is DenseRowState:
        assert not larger and {k: v.data_ptr() for k, v in opt.states[0]._bufs.items()} == buffers
    else:
        assert larger  # what the count catches


@pytest.mark.parametrize("name", DENSE_OPTIMIZERS)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("saved, loaded", [(RowState, DenseRowState), (DenseRowState, RowState)],
                         ids=["growing-to-dense", "dense-to-growing"])
def test_checkpoint_of_one_layout_resumes_in_the_other_at_another_mp_bitwise(name, value_dtype, saved, loaded,
                                                                              tmp_path):
    """2 steps on 2 uneven shards (mp 2) in one layout, each shard's rows and row state saved as
    Checkpointer.save writes them; loaded at mp 1 into the other layout: the weights and state are
    bitwise those of an uninterrupted mp-1 run in that layout, at the resume and 3 steps later (the
    state dict format is the same, and the rows without state stay without: a bf16 row's master
    is made from its stored row at its first update after the resume, as in the run)."""
    halves = shards([(0, 17), (17, R)], value_dtype)
    halves_opt = [row_optimizer(name, [h], saved) for h in halves]
    run(halves, halves_opt, range(2))
    (tmp_path / "memory_optim").mkdir()
    for half, opt in zip(halves, halves_opt):
        save_memory([half], ["layer0"], tmp_path)
        rows_file = f"rows_{half.row_start}_{half.row_end}.safetensors"  # as Checkpointer.save names it
        save_row_state(opt.state_dict(), tmp_path / "memory_optim" / rows_file)
    (resumed,) = shards([(0, R)], value_dtype)
    with torch.no_grad():
        resumed.weight.zero_()
    load_memory([resumed], ["layer0"], tmp_path)
    resumed_opt = row_optimizer(name, [resumed], loaded)
    load_memory_optimizer(resumed_opt, [resumed], tmp_path)
    (whole,) = shards([(0, R)], value_dtype)
    whole_opt = row_optimizer(name, [whole], loaded)
    run([whole], [whole_opt], range(2))
    assert_same([resumed], [resumed_opt], [whole], [whole_opt])
    run([resumed, whole], [resumed_opt, whole_opt], range(2, STEPS))
    assert_same([resumed], [resumed_opt], [whole], [whole_opt])
    assert len(resumed_opt.states[0]) < R  # rows the run never updated have no state after the resume either
