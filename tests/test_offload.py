"""Host-offloaded memory shards (model.memory_offload=host, docs/offload.md) on one process.

On a CPU run host == device, yet an offloaded table runs its own path: each lookup gathers the
unique rows it reads "on the host" and copies them "to the device", and each lookup's row
gradients move "to the host" as the table keeps them, where the optimizer step sums them. Those are copies of exact values and the same kernels on
the same operands in the same order, so the run must equal a resident one bit for bit: in
pretraining and sparse finetuning through the real Trainer, through a checkpoint save and a resume.
tests/dist/test_offload_dist.py runs the same on 2 gloo ranks.
"""
import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from smft_dist.config import CheckpointConfig, ConfigError, load_config
from smft_dist.distributed import context_from_group, gather_full_table, init_distributed
from smft_dist.memory import LocalValueTable
from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.train.checkpoint import Checkpointer
from smft_dist.train.trainer import build_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.memory_n_keys=16", "model.memory_knn=4", "model.memory_value_dim=32", "model.hidden_size=64",
         "model.num_attention_heads=4", "model.intermediate_size=32", "optim.warmup_steps=0",
         "optim.schedule=constant", "logging.progress=false"]
# (config, overrides); the finetune run starts from the tiny_pretrained fixture (its df index: tfidf)
RUNS = {
    "pretrain": ("pretrain.yaml", SMALL + ["model.init_from=null", "optim.lr=1e-2", "optim.memory_lr=1e-2"]),
    "sparse": ("finetune_sparse.yaml", ["selection.top_t=40", "logging.progress=false"]),
    # 3 micro-batches a step: the step's row gradients are several entries of the same rows, which
    # an offloaded table keeps on the host as they arrive and sums there (ValueTable._keep_grad)
    "pretrain_accum": ("pretrain.yaml", SMALL + ["model.init_from=null", "optim.lr=1e-2", "optim.memory_lr=1e-2",
                                                 "optim.grad_accum=3"]),
}
ROWS, SEQ, STEPS, SAVED_AT = 2, 12, 4, 2  # rows of a rank's batch; steps; the checkpoint after step 2


def rank_batch(step: int, rank: int, world: int) -> dict:
    x = torch.randint(3, 300, (world * ROWS, SEQ), generator=torch.Generator().manual_seed(step))[rank * ROWS:][:ROWS]
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def step_batches(step: int, rank: int, world: int, accum: int) -> list[dict]:
    """The optim.grad_accum micro-batches of one step on this rank."""
    return [rank_batch(step * accum + k, rank, world) for k in range(accum)]


def state(tr, world: int) -> list[torch.Tensor]:
    """Every dense weight (sorted by name), then every memory table (whole)."""
    dense = tr.engine.dense_state_dict()
    memory = [gather_full_table(t) if world > 1 else t.weight.detach().clone() for t in tr.tables]
    return [dense[k].clone() for k in sorted(dense)] + memory


def run_with_resume(rank: int, world: int, run: str, offload: str, init_from: str, root: str,
                    exchange: str = "auto") -> dict:
    """STEPS steps with a checkpoint after SAVED_AT, then a new run resumed from it for the rest.
    -> {"losses", "initial" / "final" (state before and after STEPS uninterrupted steps), "resumed_losses",
    "resumed" (state after the resumed run), "metrics" (the first step's), "offloaded" (each table's)}."""
    config, overrides = RUNS[run]
    overrides = overrides + [f"model.memory_offload={offload}", f"dist.memory_exchange={exchange}"]
    if init_from:
        overrides.append(f"model.init_from={init_from}")

    def build(resume: str):
        cfg = load_config(ROOT / "configs/tiny" / config, overrides)
        ctx = context_from_group(cfg.dist) if world > 1 else init_distributed(cfg.dist)
        tr = build_run(cfg, ctx)
        checkpointer = Checkpointer(CheckpointConfig(resume=resume), root, ctx)
        return tr, checkpointer, checkpointer.load(tr, None)

    tr, checkpointer, start = build("none")
    initial = state(tr, world)
    losses, metrics = [], []
    for step in range(STEPS):
        metrics.append(tr.train_step(step_batches(step, rank, world, tr.cfg.optim.grad_accum)))
        losses.append(metrics[-1]["loss"])
        if step + 1 == SAVED_AT:
            checkpointer.save(SAVED_AT, force=True)
    out = {"losses": losses, "initial": initial, "final": state(tr, world), "metrics": metrics[0],
           "offloaded": [t.offload for t in tr.tables]}
    tr, _, start = build(str(Path(root) / f"step_{SAVED_AT}"))
    assert start == SAVED_AT
    out["resumed_losses"] = [tr.train_step(step_batches(step, rank, world, tr.cfg.optim.grad_accum))["loss"]
                             for step in range(start, STEPS)]
    out["resumed"] = state(tr, world)
    return out


def assert_offload_matches_resident(resident: dict, host: dict, run: str) -> None:
    assert resident["offloaded"] == ["none"] and set(host["offloaded"]) == {"host"}, run
    assert host["losses"] == resident["losses"], run
    assert all(torch.equal(h, r) for h, r in zip(host["final"], resident["final"])), run
    # the resumed run continues bit for bit like the uninterrupted one
    assert host["resumed_losses"] == resident["losses"][SAVED_AT:], run
    assert all(torch.equal(h, r) for h, r in zip(host["resumed"], resident["final"])), run
    # it trained: the memory moved (a bitwise match of two runs that did nothing would prove nothing)
    assert not torch.equal(resident["final"][-1], resident["initial"][-1]), run
    # the step metrics report the host traffic of the offloaded run only
    assert host["metrics"]["host_rows_moved"] > 0 and host["metrics"]["host_bytes_moved"] > 0, run
    assert "host_rows_moved" not in resident["metrics"], run


@pytest.mark.parametrize("run", list(RUNS))
def test_offloaded_run_equals_resident_bitwise_through_a_resume(run, request, tmp_path):
    init_from = str(request.getfixturevalue("tiny_pretrained")) if run == "sparse" else ""
    results = {}
    for offload in ("none", "host"):
        results[offload] = run_with_resume(0, 1, run, offload, init_from, str(tmp_path / offload))
    assert_offload_matches_resident(results["none"], results["host"], run)


def fresh_table(D: int, offload: str) -> LocalValueTable:
    """A 10-row table of seeded rows, offloaded to the host or resident, ready for a step."""
    table = LocalValueTable(10, D)
    table.reset_parameters(torch.Generator().manual_seed(0))
    if offload == "host":
        table.offload_to_host()
    table.zero_step()
    return table


def test_rows_and_bytes_moved_are_counted_exactly():
    """A hand-built batch: the lookup reads the unique rows {1, 3, 5, 7} of a 10-row table once (the
    ids go down, 8 bytes each; the rows come up, D x 4); backward leaves gradients for the same 4
    rows, which move to the host as the table keeps them (ids and fp32 rows). A resident table
    moves nothing."""
    D = 6
    idx_TK = torch.tensor([[1, 3, 3], [5, 1, 7]])
    moved = {}
    for offload in ("none", "host"):
        table = fresh_table(D, offload)
        w_TK = torch.rand(2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
        table.embedding_bag(idx_TK, w_TK).sum().backward()
        ids_U, grad_UD = table.sparse_grad()
        moved[offload] = dict(table.moved_rows), dict(table.moved_bytes), ids_U, grad_UD
    assert moved["none"][:2] == ({}, {})
    rows, nbytes, ids_U, grad_UD = moved["host"]
    assert rows == {"h2d": 4, "d2h": 4}
    assert nbytes == {"h2d": 4 * D * 4, "d2h": 4 * 8 + 4 * (8 + D * 4)}
    assert ids_U.tolist() == [1, 3, 5, 7] and torch.equal(grad_UD, moved["none"][3])


def test_row_gradients_move_to_the_host_lookup_by_lookup():
    """Three lookups in one step (micro-batches of grad_accum, or memory layers) over overlapping
    rows: an offloaded table moves each lookup's row gradients to the host in that lookup's
    backward, so the device never holds more than one lookup's; the host adds each into the
    shard's sum as it arrives, sparse_grad reads it there and moves nothing more, and the sum is
    bitwise the resident table's (rows 3 and 5 get three gradients each, added one after another
    in arrival order by both)."""
    D = 5
    lookups = [torch.tensor([[3, 5], [5, 0]]), torch.tensor([[5, 3]]), torch.tensor([[3, 8], [5, 3]])]
    out = {}
    for offload in ("none", "host"):
        table = fresh_table(D, offload)
        d2h_after = []
        for k, idx_TK in enumerate(lookups):
            w_TK = torch.rand(idx_TK.shape, generator=torch.Generator().manual_seed(k), requires_grad=True)
            (table.embedding_bag(idx_TK, w_TK) * torch.arange(1.0, D + 1)).sum().backward()
            d2h_after.append(table.moved_rows["d2h"])
        moved_before = dict(table.moved_rows), dict(table.moved_bytes)
        ids_U, grad_UD = table.sparse_grad()
        assert (dict(table.moved_rows), dict(table.moved_bytes)) == moved_before  # nothing moves at the step
        assert grad_UD.device == table.weight.device
        out[offload] = d2h_after, ids_U, grad_UD
    # moved_rows["d2h"] counts row gradients (the ids a lookup reads count in bytes only), one
    # for each unique row of a lookup (3, 2, 3): each lookup's gradients cross in its own backward
    assert out["host"][0] == [3, 3 + 2, 5 + 3] and out["none"][0] == [0, 0, 0]
    assert out["host"][1].tolist() == out["none"][1].tolist() == [0, 3, 5, 8]
    assert torch.equal(out["host"][2], out["none"][2])


class SlicedTable(ShardedValueTable):
    """A one-process sharded table (the pooled lookup) that records, per read, the unique rows it
    moves to the device and, per kept gradient, the rows it moves back: what the device holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads, self.kept = [], []

    def unique_rows(self, local_ids_I):
        rows_UD, inv_I = super().unique_rows(local_ids_I)
        self.reads.append(rows_UD.shape[0])
        return rows_UD, inv_I

    def _keep_grad(self, ids_U, grad_UD, sorted_unique=False):
        self.kept.append(ids_U.numel())
        super()._keep_grad(ids_U, grad_UD, sorted_unique)


def pooled_step(dtype: torch.dtype, offload: str, slice_rows: Optional[int], allowed: Optional[torch.Tensor] = None,
                rows: int = 50, dim: int = 8, tokens: int = 7, K: int = 6, lookups: int = 3, seed: int = 0,
                group=None):
    """`lookups` pooled lookups of `tokens` x `K` entries into a `rows`-row table sharded over
    `group` (None: one process), the third restricted to `allowed` (sparse finetuning's
    selection): -> (outputs, weight gradients, the summed row gradients and the access counts),
    and the table."""
    table = SlicedTable(rows, dim, group=group, exchange="pooled", dtype=dtype)
    table.reset_parameters(torch.Generator().manual_seed(0))
    if offload == "host":
        table.offload_to_host()
    if slice_rows is not None:
        table.owner_slice_rows = slice_rows
    table.zero_step()
    got = []
    for k in range(lookups):
        if k == 2 and allowed is not None:
            table.restrict_grad_to(allowed)
        gen = torch.Generator().manual_seed(seed + k)
        idx_TK = torch.randint(0, rows, (tokens, K), generator=gen)
        w_TK = torch.rand(tokens, K, generator=gen, requires_grad=True)
        y_TD = table.embedding_bag(idx_TK, w_TK)
        (y_TD * torch.arange(1.0, dim + 1.0)).sum().backward()
        got += [y_TD.detach(), w_TK.grad]
    return [*got, *table.sparse_grad(), *table.access_counts()], table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("restricted", [False, True])
def test_an_offloaded_owner_works_in_slices_with_the_bits_of_one_piece(dtype, restricted):
    """However many entries a lookup sends one shard (at worst every rank's reads, when the keys
    favour it), an offloaded owner holds on the device the rows of one slice of its entries (at
    most owner_slice_rows + K, K = 6 entries per token here) and the row gradients of one slice of
    its rows (at most owner_slice_rows), each slice's gradients leaving for the host at once. Each
    bag and each row's gradient is summed by the same kernel over the same entries as in one
    piece, so every output, weight gradient, row gradient and access count equals the resident
    table's bit for bit. A lookup here sends 42 entries over about 30 rows: slices of 1, 3 and 10
    split it; 1000 does not. A resident owner slices its bags too (the fp32 copies of a bf16
    shard's rows are one slice's), with the same bits."""
    allowed = torch.tensor([3, 7, 11, 20, 44]) if restricted else None
    resident, _ = pooled_step(dtype, "none", None, allowed)
    resident_sliced, _ = pooled_step(dtype, "none", 3, allowed)
    assert all(torch.equal(a, b) for a, b in zip(resident_sliced, resident))
    for slice_rows in (1, 3, 10, 1000):
        got, table = pooled_step(dtype, "host", slice_rows, allowed)
        assert all(torch.equal(a, b) for a, b in zip(got, resident)), slice_rows
        assert max(table.reads) <= slice_rows + 6 and max(table.kept) <= slice_rows, slice_rows
        assert (len(table.reads) > 6) == (slice_rows < 42), slice_rows  # 2 reads a lookup in one piece


def test_unknown_offload_value_is_one_config_error():
    with pytest.raises(ConfigError, match=r"model.memory_offload='gpu' is not one of \['none', 'host'\]"):
        load_config(ROOT / "configs/tiny/pretrain.yaml", ["model.memory_offload=gpu"])


def test_plan_moves_the_shard_and_its_row_state_to_the_host():
    """--plan with model.memory_offload=host: the shard and its optimizer row state leave the
    per-GPU parts for the host column, which counts one process per GPU of a node (at most the
    world), with the shard's host sum of the row gradients (its R x D fp32 buffer and the ids kept)
    and what reading it at the step allocates; the device keeps the rows one lookup copies in and
    one lookup's row gradients (here the step's: one micro-batch, one memory layer)."""
    from smft_dist.model.memory_plan import memory_plan, shard_row_sum_read_bytes

    cfg = {o: load_config(ROOT / "configs/tiny/pretrain.yaml", [f"model.memory_offload={o}"]) for o in ("none", "host")}
    plans = {o: memory_plan(c, 4, 4, 2) for o, c in cfg.items()}
    resident, host = plans["none"], plans["host"]
    assert resident["host_parts"] == {} and resident["host_bytes_per_node"] == 0
    moved = ("memory_values", "memory_optimizer", "memory_optimizer_growth")
    assert {k: host["host_parts"][k] for k in moved} == {k: resident["parts"][k] for k in moved}
    assert resident["parts"]["memory_values"] > 0 and resident["parts"]["memory_optimizer"] > 0
    D, rows = cfg["host"].model.memory_value_dim, resident["settings"]["memory_rows_per_rank"]
    step_rows = resident["parts"]["memory_row_grads"] // (D * 4)  # one lookup, one layer: the step's
    assert host["host_parts"]["memory_row_grads"] == rows * D * 4 + step_rows * 8
    assert host["host_parts"]["memory_row_grad_sum"] == shard_row_sum_read_bytes(rows, step_rows, step_rows, D, True)
    assert resident["parts"]["memory_row_grads"] == host["parts"]["memory_row_grads"] > 0
    assert resident["parts"]["memory_row_grad_sum"] == 0  # one entry of unique rows: its own sum
    assert all(k not in host["parts"] for k in moved + ("memory_row_grad_sum",))
    assert resident["total_bytes"] - host["total_bytes"] == (sum(resident["parts"][k] for k in moved)
                                                             - host["parts"]["offload_rows"])
    assert host["host_bytes_per_node"] == 2 * sum(host["host_parts"].values())


def test_inspect_plan_prints_the_host_column(capsys):
    from smft_dist.model.inspect import main

    main(["--config", str(ROOT / "configs/tiny/pretrain.yaml"), "--plan", "--mp", "2", "--memory-offload", "host",
          "--json"])
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["settings"]["memory_offload"] == "host" and plan["settings"]["gpus_per_node"] == 8
    assert plan["host_bytes_per_node"] == 2 * sum(plan["host_parts"].values()) > 0  # world 2 < 8 per node
