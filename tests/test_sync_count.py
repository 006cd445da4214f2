"""How many host syncs one training step makes (tests/sync_ops.py counts the ops that would make the
host wait for a CUDA device), through the real `Trainer.train_step` of the tiny model: a sparse
memory finetune step (TF-IDF top-t, masked SGD) and a pretraining step (row-sparse AdamW), on 1
process and on 2 gloo ranks. Each test prints the count per call site (`pytest -s` shows it) and
fails when the step makes more than its bound: a sync added anywhere in the step breaks it.

Where the syncs of a step are (docs/performance.md "Host syncs per step" has the table):
- the trainer: 2 reads for one micro-batch (after its forward: the token counts, the non-finite
  check and the preemption flag; at the end: the metrics and the preemption flag);
- the optimizer: 1 (the rows kept by the selection, or the rows new to the AdamW state);
- the selection: 0 on one process, 1 on more (the number of real rows gathered);
- transformers: 2 when a batch holds padding (`_ignore_causal_mask_sdpa` reads the mask);
- the memory layer: 1 (layer.py: the positions of the real tokens, a `nonzero`: they size the lookup);
- the lookup: on 1 process 1 (values.py: `unique` of the slot ids); on 2 ranks 2 (sharded.py: the
  one device-to-host copy of the split sizes, which also carries the id check, and the owners'
  `unique_consecutive` of the rows they received: the access counts and the rows' runs);
- its backward, in finetuning: 1 (the rows the selection allows, a `nonzero`: values.py
  `_backward_rows` on 1 process, sharded.py `_keep_owner_row_grads` on 2 ranks);
- the step's row gradients and access counts: 0 (one micro-batch gives each table one sorted
  entry of unique rows, already coalesced; more entries take 1: `sum_entries_by_id`).
"""
import pytest
import torch

from smft_dist.config import load_config
from smft_dist.distributed import context_from_group, init_distributed
from smft_dist.selection import BackgroundIndex
from smft_dist.train.preempt import PreemptionFlag
from smft_dist.train.trainer import build_run
from tests.dist.helpers import run_ranks
from tests.sync_ops import SyncCounter

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMALL = ["model.memory_n_keys=16", "model.memory_knn=4", "model.memory_value_dim=32", "model.hidden_size=64",
         "model.num_attention_heads=4", "model.intermediate_size=32", "optim.warmup_steps=0",
         "model.init_from=null", "logging.progress=false"]
CONFIGS = {
    "finetune": ("finetune_sparse.yaml", ["selection.mode=tf", "selection.top_t=20"]),
    "pretrain": ("pretrain.yaml", []),
}
# Host syncs per step at most (before issue 24: finetune 34, pretrain 25 on 1 process), in all, in
# the memory path (smft_dist/memory/) and outside it. The 2-rank finetune bound is rank 0's: rank
# 1's shard gets no selected row gradient here, so its optimizer has nothing to intersect (9).
BOUND = {("finetune", 1): 8, ("finetune", 2): 10, ("pretrain", 1): 7, ("pretrain", 2): 8}
# The layer 1, the lookup 1 (2 on 2 ranks), the restricted backward 1 in finetuning.
BOUND_MEMORY = {("finetune", 1): 3, ("finetune", 2): 4, ("pretrain", 1): 2, ("pretrain", 2): 3}
# The trainer 2, the optimizer 1, transformers 2, the selection on 2 ranks 1.
BOUND_OUTSIDE_MEMORY = {("finetune", 1): 5, ("finetune", 2): 6, ("pretrain", 1): 5, ("pretrain", 2): 5}


def batch(rank: int) -> dict:
    """2 rows of 12 tokens; the second row ends in 4 padding tokens (labels -100)."""
    x = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    return {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}


def trainer(world: int, kind: str):
    config, overrides = CONFIGS[kind]
    cfg = load_config(ROOT / "configs/tiny" / config, SMALL + overrides)
    ctx = context_from_group(cfg.dist) if world > 1 else init_distributed(cfg.dist)
    tr = build_run(cfg, ctx)
    if kind == "finetune":  # the TF-IDF path: a df index (built from no batch: every df is 0)
        tr.df_indexes = [BackgroundIndex.empty(t) for t in tr.tables]
        tr.cfg.selection.mode = "tfidf"
    return tr


def count_step(rank: int, world: int, kind: str) -> tuple[int, int, str, list]:
    """One warm-up step (it allocates the optimizer's row state), then the second step counted.
    -> (syncs, those outside smft_dist/memory/, their breakdown, the collectives the trainer ran)."""
    tr = trainer(world, kind)
    tr.train_step([batch(rank)])
    with SyncCounter() as syncs:
        tr.train_step([batch(rank)])
    outside = sum("smft_dist/memory/" not in site for _, site in syncs.events)
    return (len(syncs), outside, syncs.breakdown(),
            [op for op, site in syncs.collectives if "train/trainer.py" in site])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_syncs_per_step_one_process(kind):
    n, outside, breakdown, _ = count_step(0, 1, kind)
    print(f"\n{kind} step, 1 process: {n} host syncs\n{breakdown}")
    assert n <= BOUND[kind, 1] and outside <= BOUND_OUTSIDE_MEMORY[kind, 1], breakdown
    assert n - outside <= BOUND_MEMORY[kind, 1], breakdown


def _preempted(rank: int, world: int) -> list[bool]:
    """Rank 1's flag is set (as its signal handler would) before the second of 2 steps."""
    tr = trainer(world, "pretrain")
    tr.preemption = PreemptionFlag()
    tr.train_step([batch(rank)])
    seen = [tr.preempted]
    tr.preemption.flag = rank == 1
    tr.train_step([batch(rank)])
    return seen + [tr.preempted]


def _two_rank_runs(rank: int, world: int) -> dict:
    return {**{kind: count_step(rank, world, kind) for kind in CONFIGS}, "preempted": _preempted(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Every 2-rank measurement in one pair of processes (starting them is most of the cost)."""
    return run_ranks(_two_rank_runs, 2)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_syncs_per_step_two_ranks(two_ranks, kind):
    """Also: the trainer's own collectives are 2 all-reduces per step of one micro-batch (the
    metrics, the non-finite check and the preemption flag ride on them)."""
    for rank, runs in enumerate(two_ranks):
        n, outside, breakdown, collectives = runs[kind]
        print(f"\n{kind} step, rank {rank} of 2: {n} host syncs\n{breakdown}")
        assert n <= BOUND[kind, 2] and outside <= BOUND_OUTSIDE_MEMORY[kind, 2], breakdown
        assert n - outside <= BOUND_MEMORY[kind, 2], breakdown
        assert collectives == ["c10d.allreduce_.default"] * 2


def test_a_signal_on_one_rank_preempts_every_rank_at_the_step_end(two_ranks):
    assert [runs["preempted"] for runs in two_ranks] == [[False, True], [False, True]]


def _read(x):
    return x.tolist()


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6)
    mask = x > 2
    with SyncCounter() as syncs:
        x.sum().item(), bool(mask.any()), int(x.max())
        x.nonzero(), torch.where(mask), x[mask], torch.masked_select(x, mask)
        y = x.clone()
        y[mask] = 0
        torch.unique(x), torch.unique_consecutive(x), torch.bincount(x)
        torch.repeat_interleave(x, x), torch.repeat_interleave(x, x, output_size=15)
        torch.isin(torch.arange(100), x), torch.isin(torch.arange(100), x, assume_unique=True)
        _read(x), x.cpu(), x.to("cpu"), torch.tensor([1, 2], device=x.device)
        torch.tensor([], device=x.device), x.to(x.device), torch.sort(x), torch.topk(x, 2), x.cumsum(0),
        x[x.argmax()[None]]  # none of these syncs
    ops = [op for op, _ in syncs.events]
    assert ops == ["aten._local_scalar_dense.default"] * 3 + [
        "aten.nonzero.default", "aten.nonzero.default", "aten.index.Tensor", "aten.masked_select.default",
        "aten.index_put_.default", "aten._unique2.default", "aten.unique_consecutive.default",
        "aten.bincount.default", "aten.repeat_interleave.Tensor", "aten.isin.Tensor_Tensor",
        ".tolist()", ".cpu()", '.to("cpu")', "torch.tensor(host data, device=...)"]
    assert syncs.events[-4][1].startswith("tests/test_sync_count.py:") and "_read" in syncs.events[-4][1]
