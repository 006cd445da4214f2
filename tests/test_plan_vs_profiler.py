"""The plan's per-step terms against what a real step allocates (smft_dist.model.memory_plan).

One train step of a small model on the CPU runs under `torch.profiler.profile(profile_memory=True)`;
the measured figure is the peak, over the step, of the bytes allocated minus the bytes freed since
it began: everything the step adds on top of what it started with. The step starts with the weights
(and the bf16 copies of frozen linears), the optimizers' state (a first step on the same batch made
it) and a zero gradient on every trainable weight (so backward accumulates into it instead of
allocating the persistent gradients, which the plan counts apart). The peak is at the top of
backward, where the forward's saved tensors (the fetched rows of the one-process lookup among them),
the logits, the loss's gradients and autocast's bf16 weight copies are alive together: the plan's
`activations + logits + autocast_weight_copies`, plus `lookup_exchange` on two ranks (the pooled
exchange's buffers; they are alive in the memory layer's forward and backward, not at the peak,
so the plan's sum is an upper bound by that much, ~2% here).

Tolerance 20% (the issue's bound), and why the gap is far smaller (measured 0.96-1.02): the CPU
allocator has no cache, so every byte the profiler sees is a tensor's. What the plan leaves out at
the peak is each under 2% of it at these shapes: the first fresh weight gradient before it is
accumulated (lm_head's V x h x 4 = 256 KiB of 5-18 MiB), the rotary cos/sin. The sparse step counts
its padding positions (which make no lookups) at the full T, an overcount of the bag path's few
hundred bytes per padded token (<4%). The plan before this change missed by 21-106% on three of
the four one-process cases (no RMSNorm upcast, no loss backward, no autocast input casts).
"""
import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from smft_dist.config import load_config
from smft_dist.distributed import init_distributed
from smft_dist.model.memory_plan import memory_plan
from smft_dist.train.trainer import build_run
from tests.conftest import ROOT

BATCH, SEQ, REAL = 8, 64, 48  # the sparse step's facts: 48 real tokens padded to 64, as the paper pads
# 256 slots x D 32: the step's 8,192 slot draws all but surely touch every slot, so the one-process
# lookup's fetched rows reach the plan's bound min(T x heads x knn, slots) instead of sitting below it.
SMALL_MEMORY = ["model.memory_n_keys=16", "model.memory_knn=4", "model.memory_value_dim=32"]


def step_peak_bytes(step) -> int:
    """Peak of (allocated - freed) CPU bytes since `step()` began, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # one event per allocation (+) and free (-), CPU only here
    return max(itertools.accumulate(n for _, n in events))


def profiled_step(rank: int, world: int, mode: str, precision: str, out_dir: str) -> tuple[int, dict]:
    """-> (measured peak bytes of this rank's step, the plan's parts for the run). Under
    `run_ranks` (world > 1) the memory is sharded and looked up by the pooled exchange (named:
    `auto` would fetch the rows of this 256-slot table, fewer bytes than 2 x T x D partial sums)."""
    overrides = [f"precision={precision}", f"data.batch_size={BATCH}", f"data.seq_len={SEQ}", f"out_dir={out_dir}",
                 f"dist.memory_exchange={'pooled' if world > 1 else 'auto'}", *SMALL_MEMORY]
    overrides += (["mode=finetune", "method=sparse_memory", "selection.mode=tf", "selection.top_t=50"]
                  if mode == "sparse_finetune" else ["mode=pretrain"])
    cfg = load_config(ROOT / "configs/model/tiny.yaml", overrides)
    trainer = build_run(cfg, init_distributed(cfg.dist))
    ids = torch.randint(3, cfg.model.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)
    if mode == "sparse_finetune":
        mask[:, REAL:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    trainer.train_step(batch)  # the optimizers' state exists from here on
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    measured = step_peak_bytes(lambda: trainer.train_step(batch))
    if world > 1:
        assert all(t.last_exchange == "pooled" for t in trainer.tables)
    return measured, memory_plan(cfg, world, world)["parts"]


def planned_step_bytes(parts: dict) -> int:
    """The plan's parts a step allocates on top of the state it starts with, at one micro-batch."""
    return parts["activations"] + parts["logits"] + parts["autocast_weight_copies"] + parts["lookup_exchange"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["pretrain", "sparse_finetune"])
def test_plan_matches_the_profiled_step_peak(mode, precision, tmp_path):
    measured, parts = profiled_step(0, 1, mode, precision, str(tmp_path))
    bf16_copies = parts["autocast_weight_copies"] + parts["frozen_bf16_weights"]
    assert parts["lookup_exchange"] == 0 and (bf16_copies > 0) == (precision == "bf16")
    assert 0.8 <= measured / planned_step_bytes(parts) <= 1.2, (measured, parts)


def pooled_steps(rank: int, world: int, out_dir: str) -> list[tuple[int, dict]]:
    """A pretraining and a sparse finetuning step in the same ranks (one spawn for both)."""
    return [profiled_step(rank, world, mode, "bf16", f"{out_dir}/{mode}") for mode in ("pretrain", "sparse_finetune")]


def test_plan_matches_the_profiled_step_peaks_of_the_pooled_exchange(tmp_path):
    """Two gloo ranks, bf16: each rank's peak against the plan at world 2, mp 2 (the pooled
    exchange's saved entries and buffers instead of the fetched rows)."""
    from smft_dist.distributed.spawn import run_ranks

    for rank_results in run_ranks(pooled_steps, 2, str(tmp_path)):
        for measured, parts in rank_results:
            assert parts["lookup_exchange"] > 0 and parts["activations"] > 0
            assert 0.8 <= measured / planned_step_bytes(parts) <= 1.2, (measured, parts)
