"""`RowSparse.coalesce` sums each id's rows in an order fixed by the order they were added, with no
accumulating scatter whose CUDA kernel leaves the order of a float sum to its atomics: replicas
that hold the same entries in the same order (tests/dist/test_replica_sums.py) get the same bits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smft_dist.memory.values import RowSparse, add_rows_in_order, sum_by_id
from tests.sync_ops import SyncCounter

aten = torch.ops.aten
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The sums torch.use_deterministic_algorithms lists as nondeterministic on CUDA (they accumulate
# with atomics, in the order the threads happen to run); index_put_ counts when accumulate=True,
# cumsum on floats.
ORDER_DEPENDENT_ON_CUDA = {aten.index_add, aten.index_add_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce,
                           aten.scatter_reduce_, aten.put, aten.put_, aten.bincount, aten.embedding_bag,
                           aten._embedding_bag}


class AtenOps(TorchDispatchMode):
    """Records every aten op run inside it, with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _order_dependent(func, args, kwargs) -> bool:
    if func.overloadpacket in ORDER_DEPENDENT_ON_CUDA:
        return True
    if func.overloadpacket in (aten.index_put, aten.index_put_, aten._index_put_impl_):
        return bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False))
    if func.overloadpacket in (aten.cumsum, aten.cumsum_):
        return args[0].is_floating_point()
    return False


def _entries(device):
    """Row gradients of 3 ids in 4 chunks. Id 7's rows 1e8, 1, -1e8, 1 sum to 1 left to right in fp32
    (1e8 + 1 rounds to 1e8: the fp32 spacing there is 8) and to 0 pairwise: the order shows."""
    acc = RowSparse()
    f = dict(dtype=torch.float32, device=device)
    acc.add(torch.tensor([7, 2], device=device), torch.tensor([[1e8, 0.5], [0.5, 3.0]], **f))
    acc.add(torch.tensor([7], device=device), torch.tensor([[1.0, 0.25]], **f))
    acc.add(torch.tensor([7, 2, 4], device=device), torch.tensor([[-1e8, 0.25], [0.25, -3.0], [2.0, 2.0]], **f))
    acc.add(torch.tensor([7], device=device), torch.tensor([[1.0, 1e8]], **f))
    return acc


def test_coalesce_adds_each_ids_rows_one_after_another_in_the_order_added():
    ids, vals = _entries("cpu").coalesce((2,))
    assert torch.equal(ids, torch.tensor([2, 4, 7]))
    # id 7: ((1e8 + 1) - 1e8) + 1 = 1 and ((0.5 + 0.25) + 0.25) + 1e8 = 1e8 (+1 is below its spacing);
    # id 2: 0.5 + 0.25, 3 - 3; id 4: its one row. Exact: each is one fixed sequence of fp32 adds.
    want = torch.tensor([[0.75, 0.0], [2.0, 2.0], [1.0, 1e8]])
    assert torch.equal(vals, want)


def test_coalesce_runs_no_sum_whose_order_cuda_leaves_to_atomics():
    for dtype, trailing in ((torch.float32, (2,)), (torch.long, ())):  # row gradients, access counts
        acc = _entries("cpu") if dtype == torch.float32 else RowSparse()
        if dtype == torch.long:
            acc.add(torch.tensor([3, 1, 3]), torch.tensor([2, 1, 5]))
            acc.add(torch.tensor([1]), torch.tensor([4]))
        with AtenOps() as ops:
            acc.coalesce(trailing, dtype=dtype)
        bad = [str(func) for func, args, kwargs in ops.calls if _order_dependent(func, args, kwargs)]
        assert not bad, f"coalesce ran {bad}: on CUDA their sums' order depends on thread scheduling"


@pytest.mark.parametrize("device", DEVICES)
def test_coalesce_under_deterministic_algorithms(device):
    """torch refuses, in this mode, the ops that have no deterministic kernel on the device (on
    CUDA: float cumsum, accumulating put_, bincount with weights...), and picks deterministic ones
    where it has both. On CPU, where coalesce's ops are all deterministic, this proves only that
    none is refused and the mode changes no bit; on CUDA it also proves no CUDA kernel is refused."""
    want = _entries(device).coalesce((2,))
    torch.use_deterministic_algorithms(True)
    try:
        got = _entries(device).coalesce((2,))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _in_order_reference(ids: list[int], vals: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each id's rows in arrival order, added one after another: ((v0 + v1) + v2) + v3."""
    out = {}
    for n, i in enumerate(ids):
        out[i] = out[i] + vals[n] if i in out else vals[n].clone()
    return out


def test_sum_by_id_adds_in_arrival_order_with_three_host_reads():
    """Runs of 1 to 9 rows per id, values spread over 16 orders of magnitude so that any other
    order of the adds shows in the bits (the pairwise tree this replaced differs on most ids)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.repeat_interleave(torch.arange(12), torch.randint(1, 10, (12,), generator=g))
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    vals = torch.randn(ids.numel(), 3, generator=g) * 10.0 ** torch.randint(-8, 8, (ids.numel(), 1), generator=g)
    with SyncCounter() as syncs:
        uniq, sums = sum_by_id(ids, vals)
    # the number of ids (torch.unique), and the number of passes (the most rows of one id) and
    # the rows of each pass (unique_consecutive's size, then its counts)
    assert len(syncs) == 3, syncs.breakdown()
    ref = _in_order_reference(ids.tolist(), vals)
    assert uniq.tolist() == sorted(ref) and all(torch.equal(sums[k], ref[i]) for k, i in enumerate(uniq.tolist()))


@pytest.mark.parametrize("chunk_elements", [1, 5, 1 << 20])
def test_add_rows_in_order_gives_the_same_bits_in_any_chunks(chunk_elements):
    """Into a non-zero table, repeated rows and not: the chunks of the gather-add-write change
    nothing (a row's adds are in its own order whatever the chunk)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 3, generator=g) * 1e6
    idx = torch.randint(0, 6, (40,), generator=g)
    vals = torch.randn(40, 3, generator=g) * 10.0 ** torch.randint(-6, 6, (40, 1), generator=g)
    out = base.clone()
    add_rows_in_order(out, idx, vals, unique=False, chunk_elements=chunk_elements)
    want = base.clone()
    for n, i in enumerate(idx.tolist()):
        want[i] = want[i] + vals[n]
    assert torch.equal(out, want)
    perm = torch.randperm(6, generator=g)
    out_u = base.clone()
    add_rows_in_order(out_u, perm, vals[:6], unique=True, chunk_elements=chunk_elements)
    assert torch.equal(out_u[perm], base[perm] + vals[:6])


def test_one_sorted_unique_entry_is_already_coalesced():
    """One micro-batch's rows on one rank: coalesce runs no op at all (so no host sync); two such
    entries, or one that may repeat ids, are still summed."""
    ids, vals = torch.tensor([2, 5, 9]), torch.tensor([[1.0], [2.0], [3.0]])
    acc = RowSparse()
    acc.add(ids, vals, sorted_unique=True)
    with AtenOps() as ops:
        got = acc.coalesce((1,))
    assert ops.calls == [] and got[0] is ids and got[1] is vals
    acc.add(torch.tensor([5]), torch.tensor([[4.0]]), sorted_unique=True)
    assert acc.coalesce((1,))[1].flatten().tolist() == [1.0, 6.0, 3.0]
    repeats = RowSparse()
    repeats.add(torch.tensor([4, 4]), torch.tensor([1, 2]))
    assert [t.tolist() for t in repeats.coalesce()] == [[4], [3]]


def test_a_scale_of_one_runs_nothing_and_other_factors_scale_in_place():
    """The trainer scales every step's row gradients by 1 / world as their owner keeps them: at
    world 1 nothing may touch them, elsewhere one in-place multiply (no copy)."""
    from smft_dist.memory import LocalValueTable

    table = LocalValueTable(10, 2)
    ids, grad = torch.tensor([1, 4]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with AtenOps() as ops:
        table._keep_grad(ids, grad, sorted_unique=True)
    assert ops.calls == [] and table.sparse_grad()[1] is grad
    table.zero_step()
    table.set_grad_scale(0.5)
    with AtenOps() as ops:
        table._keep_grad(ids, grad, sorted_unique=True)
    assert {str(func) for func, _, _ in ops.calls} == {"aten.mul_.Tensor"}
    assert table.sparse_grad()[1].tolist() == [[0.5, 1.0], [1.5, 2.0]]
    table.zero_step()
    assert table.grad_scale == 1.0  # each step sets its own
