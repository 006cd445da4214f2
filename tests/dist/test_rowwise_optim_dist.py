"""Row-wise optimizers on a table sharded over 2 gloo ranks: the same result as one process and as
the float64 reference through the real lookup exchange, and their row state through a checkpoint
written at mp=2 and resumed at mp=1, continuing bit for bit like an uninterrupted run."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from smft_dist.checkpoint.layout import load_memory, load_memory_optimizer, save_memory, save_row_state
from smft_dist.memory import LocalValueTable
from smft_dist.memory.sharded import ShardedValueTable
from tests.dist.helpers import run_ranks
from tests.test_rowwise_optim import OPTIMIZERS, U, Reference

pytestmark = pytest.mark.slow

N, D = 49, 8  # uneven shards over 2 ranks: rows [0, 25) and [25, 49)
T, K, STEPS = 16, 4, 3  # tokens of the global batch (8 per rank), ids per token


def full_table(dtype=torch.float32) -> LocalValueTable:
    table = LocalValueTable(N, D, dtype=dtype)
    table.reset_parameters(torch.Generator().manual_seed(0))
    return table


def shard_of(full: LocalValueTable) -> ShardedValueTable:
    table = ShardedValueTable(N, D, group=dist.group.WORLD, dtype=full.weight.dtype)
    with torch.no_grad():
        table.weight.copy_(full.weight[table.row_start:table.row_end])
    return table


def batch(step: int):
    """-> idx_TK, w_TK, target_TD of one global batch. Weights and targets are positive, so each
    element of a row's gradient (a sum of w x target terms) has no cancellation: its fp32
    rounding is relative, whatever order the ranks sum it in (the tolerance below)."""
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randint(0, N, (T, K), generator=g), torch.rand(T, K, generator=g) + 0.5,
            torch.rand(T, D, generator=g) + 0.5)


def train(table, name: str, tokens: slice):
    """STEPS steps of loss = sum(bag x target) over `tokens` of each global batch."""
    opt = OPTIMIZERS[name](table)
    for step in range(STEPS):
        idx_TK, w_TK, target_TD = batch(step)
        table.zero_step()
        (table.embedding_bag(idx_TK[tokens], w_TK[tokens]) * target_TD[tokens]).sum().backward()
        opt.step()
    return opt


def _world2_and_world1(rank, world, names):
    """-> {name: (the table trained on 2 ranks, gathered; the table trained in one process)}."""
    from smft_dist.distributed import gather_full_table

    out = {}
    for name in names:
        full = full_table()
        sharded = shard_of(full)
        train(sharded, name, slice(rank * T // world, (rank + 1) * T // world))
        train(full, name, slice(0, T))  # world 1: the whole batch in one process
        out[name] = gather_full_table(sharded), full.weight.detach().clone()
    return out


@pytest.fixture(scope="module")
def trained_at_world_2_and_1():
    """One spawn of 2 ranks for every optimizer (a spawn costs seconds)."""
    return run_ranks(_world2_and_world1, 2, list(OPTIMIZERS))[0]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_ranks_match_one_process_and_the_reference(trained_at_world_2_and_1, name):
    world2, world1 = trained_at_world_2_and_1[name]
    ref = Reference(full_table().weight.detach(), name)
    for step in range(STEPS):
        idx_TK, w_TK, target_TD = batch(step)
        grad_ND = torch.zeros(N, D, dtype=torch.float64)
        terms_TKD = w_TK.double()[..., None] * target_TD.double()[:, None]
        grad_ND.index_add_(0, idx_TK.reshape(-1), terms_TKD.reshape(-1, D))
        ids = torch.unique(idx_TK).tolist()
        ref.step(ids, grad_ND[ids])
    # fp32 against float64: the optimizer's rounding (Reference.tolerance) plus the gradient's: each
    # element sums at most T x K positive terms, relative error <= T K u in any order (1 or 2 ranks,
    # pooled or row exchange); the update, degree 0 in g's scale, moves by at most twice that
    # relative (numerator, and the root of the mean square) of the largest update, per step.
    atol = ref.tolerance(STEPS) + STEPS * 2 * T * K * U * ref.largest_update
    touched = torch.zeros(N, dtype=torch.bool)
    for step in range(STEPS):
        touched[batch(step)[0].reshape(-1)] = True
    for got in (world2, world1):
        torch.testing.assert_close(got, ref.w.float(), rtol=0, atol=atol)
        assert torch.equal(got[~touched], full_table().weight.detach()[~touched])  # lazy: untouched rows
    assert (world2 - full_table().weight.detach())[touched].abs().amin(1).gt(0).all()  # every touched row moved


def row_grads(step: int):
    """-> (global ids, their fp32 gradient rows) of step `step`: pushed as is, so every row gets the
    same bits on any shard layout."""
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randperm(N, generator=g)[: N // 2].sort().values
    return ids, torch.randn(len(ids), D, generator=g)


def push_step(table, step: int) -> None:
    ids, grad = row_grads(step)
    mine = table.owns(ids)
    table.zero_step()
    table._grad.add(ids[mine] - table.row_start, grad[mine])  # this shard's rows (no lookup: exact bits)


CHECKPOINTED = {"adagrad": ("rowwise_adagrad", torch.float32), "adam_rowwise-bf16": ("adam_rowwise", torch.bfloat16),
                "adam_rowwise-no-momentum": ("adam_rowwise_no_momentum", torch.float32)}


def _two_steps_then_save(rank, world, root):
    """For each CHECKPOINTED case, 2 steps on this rank's shard, saved in root/<case>/ as
    Checkpointer.save writes a shard: its rows and its optimizer's row state."""
    for case, (name, value_dtype) in CHECKPOINTED.items():
        table = shard_of(full_table(value_dtype))
        opt = OPTIMIZERS[name](table)
        for step in range(2):
            push_step(table, step)
            opt.step()
        step_dir = Path(root) / case
        (step_dir / "memory_optim").mkdir(parents=True, exist_ok=True)
        save_memory([table], ["layer0"], step_dir)
        rows_file = f"rows_{table.row_start}_{table.row_end}.safetensors"
        save_row_state(opt.state_dict(), step_dir / "memory_optim" / rows_file)


def sorted_state(opt) -> dict:
    sd = opt.state_dict()["tables"][0]
    order = torch.argsort(sd["ids"])
    return {k: v[order] for k, v in sd.items()}


@pytest.fixture(scope="module")
def saved_at_mp2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rowwise_ckpt")
    run_ranks(_two_steps_then_save, 2, str(root))
    return root


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_row_state_checkpoint_at_mp2_resumes_at_mp1_bitwise(saved_at_mp2, case):
    name, value_dtype = CHECKPOINTED[case]
    step_dir = saved_at_mp2 / case
    assert len(list((step_dir / "memory_optim").glob("rows_*.safetensors"))) == 2

    resumed = full_table(value_dtype)
    with torch.no_grad():
        resumed.weight.zero_()
    load_memory([resumed], ["layer0"], step_dir)
    resumed_opt = OPTIMIZERS[name](resumed)
    load_memory_optimizer(resumed_opt, [resumed], step_dir)
    uninterrupted = full_table(value_dtype)
    opt = OPTIMIZERS[name](uninterrupted)
    for step in range(4):
        if step == 2:  # the checkpoint holds the state after 2 steps
            for k, v in sorted_state(opt).items():
                assert torch.equal(sorted_state(resumed_opt)[k], v), k
        if step >= 2:
            push_step(resumed, step)
            resumed_opt.step()
        push_step(uninterrupted, step)
        opt.step()
    assert torch.equal(resumed.weight, uninterrupted.weight)
    for k, v in sorted_state(opt).items():
        assert torch.equal(sorted_state(resumed_opt)[k], v), k
