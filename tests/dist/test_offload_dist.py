"""Host-offloaded shards on 2 gloo ranks (docs/offload.md): bitwise a resident run in pretraining
(both exchanges) and sparse finetuning through the real Trainer, a checkpoint and a resume; and the
rows each owner moves counted exactly on a hand-built batch. The 1-process side and the argument
for bitwise equality: tests/test_offload.py."""
import pytest
import torch
import torch.distributed as dist

from smft_dist.memory.sharded import ShardedValueTable
from tests.dist.helpers import run_ranks
from tests.test_offload import assert_offload_matches_resident, pooled_step, run_with_resume

pytestmark = pytest.mark.slow

CASES = [("pretrain", "pooled"), ("pretrain", "rows"), ("pretrain_accum", "rows"), ("sparse", "auto")]


def _on_each_rank(rank, world, init_from, root):
    runs = {(run, exchange, offload): run_with_resume(rank, world, run, offload, init_from if run == "sparse" else "",
                                                      f"{root}/{run}_{exchange}_{offload}", exchange)
            for run, exchange in CASES for offload in ("none", "host")}
    return runs, _moved(rank), _sliced(rank)


@pytest.fixture(scope="module")
def two_ranks(tiny_pretrained, tmp_path_factory):
    """-> per rank, (the runs of every case, the hand-built batch's counters, the sliced owner's
    lookups): one spawn for all
    (a spawn costs seconds)."""
    return run_ranks(_on_each_rank, 2, str(tiny_pretrained), str(tmp_path_factory.mktemp("offload")))


@pytest.mark.parametrize("run,exchange", CASES)
def test_offloaded_run_equals_resident_bitwise_on_2_ranks(two_ranks, run, exchange):
    for rank_result, *_ in two_ranks:
        assert_offload_matches_resident(rank_result[run, exchange, "none"], rank_result[run, exchange, "host"],
                                        f"{run} {exchange}")


N, D = 10, 4  # rank 0 owns rows [0, 5), rank 1 rows [5, 10)
# The global batch: rank 0 looks up rows 1, 3, 6 (1 twice), rank 1 rows 3, 6, 8, 9 (6 twice).
IDX = [torch.tensor([[1, 3], [1, 6]]), torch.tensor([[6, 3], [8, 6], [9, 9]])]
# Unique rows each owner reads: rank 0 {1, 3}; rank 1 {6, 8, 9}.
UNIQUE_READ = [2, 3]
# Row gradients each owner receives by the rows exchange, a row once per requester that read it:
# rank 0 {1, 3} from rank 0 and {3} from rank 1; rank 1 {6} from rank 0 and {6, 8, 9} from rank 1.
ROWS_RECEIVED = [3, 4]


def _moved(rank):
    out = {}
    for exchange in ("pooled", "rows"):
        table = ShardedValueTable(N, D, group=dist.group.WORLD, exchange=exchange)
        table.reset_parameters(torch.Generator().manual_seed(0))
        table.offload_to_host()
        table.zero_step()
        idx_TK = IDX[rank]
        w_TK = torch.rand(idx_TK.shape, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        table.embedding_bag(idx_TK, w_TK).sum().backward()
        ids_U, _ = table.sparse_grad()
        out[exchange] = dict(table.moved_rows), dict(table.moved_bytes), ids_U.tolist()
    return out


def test_each_owner_moves_the_unique_rows_it_reads(two_ranks):
    """Rows moved = the unique rows of the owner's shard that the lookup read, whoever asked and
    however often: both exchanges read them once in the forward; pooled reads them again in the
    backward for the weights' gradients (autograd keeps no rows), rows keeps them at the requester.
    Each owner moves the row gradients it keeps to the host as they arrive: pooled, one per row
    (the owner computes them); rows, one per requester of the row (summed on the host)."""
    for rank, (_, got, _) in enumerate(two_ranks):
        U = UNIQUE_READ[rank]
        for exchange, reads, grads in (("pooled", 2, U), ("rows", 1, ROWS_RECEIVED[rank])):
            rows, nbytes, grad_ids = got[exchange]
            assert rows == {"h2d": reads * U, "d2h": grads}, (rank, exchange)
            assert nbytes == {"h2d": reads * U * D * 4, "d2h": reads * U * 8 + grads * (8 + D * 4)}, (rank, exchange)
            assert len(grad_ids) == U, (rank, exchange)


def _sliced(rank):
    """The pooled lookup of a 40-row table over 2 ranks, 9 tokens x 4 entries a rank, 2 lookups a
    step: resident, and offloaded with owner slices of 5 rows -> (outputs, weight gradients, row
    gradients, counts) of each, and the offloaded owner's reads and kept gradients."""
    shape = dict(rows=40, dim=6, tokens=9, K=4, lookups=2, seed=10 * rank, group=dist.group.WORLD)
    resident, _ = pooled_step(torch.float32, "none", None, **shape)
    host, table = pooled_step(torch.float32, "host", 5, **shape)
    return resident, host, table.reads, table.kept


def test_an_offloaded_owner_slices_its_pooled_work_with_the_bits_of_a_resident_one(two_ranks):
    """Each owner receives both ranks' entries for its 20 rows (about 36 entries over about 16
    rows a lookup): sliced by 5, it reads at most 5 + 4 rows at a time (K = 4 entries a token)
    and keeps at most 5 rows' gradients at a time, and every output, weight gradient, summed row
    gradient and access count equals the resident run's bit for bit (the 1-process argument:
    tests/test_offload.py::test_an_offloaded_owner_works_in_slices_with_the_bits_of_one_piece)."""
    for rank, (*_, (resident, host, reads, kept)) in enumerate(two_ranks):
        assert all(torch.equal(a, b) for a, b in zip(host, resident)), rank
        assert max(reads) <= 5 + 4 and max(kept) <= 5 and len(reads) > 4, (rank, reads, kept)
