"""Every engine x method x world x precision x accumulation a user can launch either trains, giving
the losses and weights of every equivalent run, or is refused at start-up by a ConfigError naming
the keys (the table of docs/training.md "Supported engine x method combinations" lists which).

5 engines x 3 methods x 2 worlds x 2 precisions x 2 grad_accum = 120 runs, in two shared
processes: one without a process group (world 1, as `python launchers/train.py` starts) and one
2-rank gloo group. Each loops over its runs doing what the train loop does before its first step
(`load_config`, `validate(cfg, world)`, `build_run`), then 3 `train_step`s on one global batch of
4 rows, sliced per rank and then per micro-batch. The ranks' and micro-batches' label-token
counts differ (padding): a step that does not weigh every label token of the global batch alike
(e.g. a mean per rank, then over ranks) gives world 2 other losses than world 1.
"""
from __future__ import annotations

import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch

from tests.conftest import PY, ROOT, run_cli
from tests.dist.helpers import run_ranks

# Engines that build no process group come first: the world-1 process then runs them as a user's
# single process does, before DeepSpeed's world-1 group exists.
ENGINES = {
    "none": ["dist.engine=none"],
    "fsdp2": ["dist.engine=fsdp2"],
    "zero0": ["dist.engine=deepspeed", "dist.zero_stage=0"],
    "zero1": ["dist.engine=deepspeed", "dist.zero_stage=1"],
    "zero2": ["dist.engine=deepspeed", "dist.zero_stage=2"],
}
METHODS = {
    "full": ["method=full", "optim.lr=1e-2", "optim.memory_lr=1e-2"],
    "lora": ["method=lora", "lora.r=4", "lora.alpha=8", "optim.lr=1e-2"],
    # SGD lr per label token (the default scale; x the 32 label tokens of the global batch). A fresh
    # model's memory adds little to the logits: only a large lr moves the loss visibly.
    "sparse_memory": ["method=sparse_memory", "selection.mode=tf", "selection.top_t=12",
                      "optim.memory_lr_scale=per_token", "optim.memory_lr=100"],
}
PRECISIONS = ("fp32", "bf16")
ACCUMS = (1, 2)
GLOBAL_ROWS, SEQ, STEPS = 4, 12, 3
# A fresh tiny model (2 layers, 256 memory slots): finetuning methods need no checkpoint.
TINY = ["mode=finetune", "model.num_hidden_layers=2", "model.memory_layers=[1]", "model.memory_n_keys=16",
        "model.memory_knn=4", "model.memory_value_dim=32", "model.memory_k_dim=32", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.intermediate_size=32", "optim.warmup_steps=0",
        "optim.schedule=constant", "optim.weight_decay=0.0", "logging.progress=false", f"steps={STEPS}"]
# Valid tokens per row (the rest is right padding): 11, 11, 3 and 7 label tokens after the shift.
# World 2: rank 0 holds 22, rank 1 10; with 2 micro-batches each micro-batch is one row.
ROW_LENGTHS = (12, 12, 4, 8)

# Relative tolerance on every loss of a run against the reference run (engine none, world 1, no
# accumulation) of the same method and precision.
# fp32: the runs differ only in summation order (per-rank and per-micro-batch partial sums, other
# matmul blockings for other batch shapes, all-reduce/reduce-scatter order), each ~2^-24 relative
# per add; AdamW turns an ulp of noise on a near-zero gradient into lr*noise/eps, a few 1e-6 of a
# weight (see WEIGHT_ATOL), which moves a loss of ~6 by well under 1e-5 of itself (1e-5 is ~80 fp32
# ulps of the loss). Weighing each rank's mean loss equally instead moves the world-2 step-3 loss by
# 8e-4 (lora) to 6e-2 (full) of itself.
# bf16: the engines keep different bf16 copies (autocast casts fp32 weights at each matmul, DeepSpeed
# and FSDP2 compute with bf16 weights): a bf16 value carries 8 significant bits, a relative rounding
# of up to 2^-9, and two such roundings (weight, activation) bound the loss's relative change by 2^-8.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 2**-8}
# fp32 weights after 3 steps: AdamW's update lr*m/(sqrt(v)+eps) maps a summation-order noise d on a
# gradient element that is ~0 to lr*d/eps: d ~ 1e-12 (fp32 ulps of the ~1e-5 sums such elements end
# in) x lr 1e-2 / eps 1e-8 = 1e-6 per step, so 3 steps stay under 2e-5. Memory rows under SGD move by
# lr x gradient, up to ~3 here: they differ by a few fp32 ulps of that (2.4e-7 each).
# (bf16 weights are compared through the losses only: their near-zero-gradient sign flips are lr-sized.)
WEIGHT_ATOL = 2e-5


def refused(engine: str, method: str, precision: str) -> bool:
    """What `validate` refuses at start-up: DeepSpeed ZeRO-0 in bf16 where DeepSpeed trains dense
    weights (its FP16_UnfusedOptimizer takes a zero-gradient AdamW step at construction)."""
    return engine == "zero0" and precision == "bf16" and method != "sparse_memory"


def global_batch() -> dict:
    """4 rows x SEQ tokens, right-padded to ROW_LENGTHS."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (GLOBAL_ROWS, SEQ), generator=g)
    mask = (torch.arange(SEQ)[None, :] < torch.tensor(ROW_LENGTHS)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def rows(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def run_one(engine: str, method: str, precision: str, accum: int, rank: int, world: int) -> dict:
    """One run on this process -> {"refused": message} | {"crashed": traceback} |
    {"losses": [STEPS floats], "dense": {name: fp32 tensor}, "memory": [N x D per memory layer]}."""
    from smft_dist.config import ConfigError, load_config, validate
    from smft_dist.distributed import context_from_group, gather_full_table, init_distributed
    from smft_dist.train.trainer import build_run

    per_rank = GLOBAL_ROWS // world
    micro = per_rank // accum
    try:
        try:
            cfg = load_config(ROOT / "configs/tiny/pretrain.yaml",
                              TINY + ENGINES[engine] + METHODS[method] +
                              [f"precision={precision}", f"optim.grad_accum={accum}", f"data.batch_size={micro}"])
            ctx = context_from_group(cfg.dist) if torch.distributed.is_initialized() else init_distributed(cfg.dist)
            validate(cfg, ctx.world_size)  # as train() does, once the world is known
            trainer = build_run(cfg, ctx)
        except ConfigError as e:
            return {"refused": str(e)}
        mine = rows(global_batch(), rank * per_rank, (rank + 1) * per_rank)
        losses = [trainer.train_step([rows(mine, k * micro, (k + 1) * micro) for k in range(accum)])["loss"]
                  for _ in range(STEPS)]
        dense = {k: v.float().clone() for k, v in trainer.engine.dense_state_dict().items()}
        memory = [gather_full_table(t).float() if world > 1 else t.weight.detach().float().clone()
                  for t in trainer.tables]
        return {"losses": losses, "dense": dense, "memory": memory}
    except Exception:
        return {"crashed": traceback.format_exc()}


def _every_run(rank: int, world: int) -> dict:
    out = {}
    for engine in ENGINES:
        for method in METHODS:
            for precision in PRECISIONS:
                for accum in ACCUMS:
                    out[engine, method, precision, accum] = run_one(engine, method, precision, accum, rank, world)
                    if world > 1:
                        torch.distributed.barrier()  # a run that failed on one rank only stops here
    return out


def _world1() -> dict:
    torch.set_num_threads(1)
    return _every_run(0, 1)


@pytest.fixture(scope="module")
def matrix() -> dict:
    """-> {(engine, method, precision, accum, world): run_one's result (rank 0's)}."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process, no group
        one = pool.submit(_world1).result(timeout=600)
    two = run_ranks(_every_run, 2, timeout=600, pg_timeout_s=60)[0]
    return {**{k + (1,): v for k, v in one.items()}, **{k + (2,): v for k, v in two.items()}}


def test_every_combination_trains_or_is_refused_at_start_up(matrix):
    crashed = {k: r["crashed"].strip().splitlines()[-1] for k, r in matrix.items() if "crashed" in r}
    assert not crashed, "crashed after start-up:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(crashed.items()))
    got = sorted(k for k, r in matrix.items() if "refused" in r)
    assert got == sorted(k for k in matrix if refused(*k[:3])), got
    for k in got:
        for key in ("dist.engine=deepspeed", "dist.zero_stage=0", "precision=bf16"):
            assert key in matrix[k]["refused"], (k, matrix[k]["refused"])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_equivalent_combinations_agree(matrix, method, precision):
    reference = matrix["none", method, precision, 1, 1]["losses"]
    rtol = LOSS_RTOL[precision]
    # The update moves the loss by far more than the tolerance: agreement is not agreement on no-ops.
    assert reference[0] - reference[-1] > 2 * rtol * reference[0], reference
    for key, r in sorted(matrix.items()):
        if key[1:3] != (method, precision) or "losses" not in r:
            continue
        for step, (got, want) in enumerate(zip(r["losses"], reference)):
            assert abs(got - want) <= rtol * want, f"{key} step {step}: loss {got} vs {want} (engine none, world 1)"


@pytest.mark.parametrize("method", METHODS)
def test_equivalent_fp32_combinations_end_with_the_same_weights(matrix, method):
    ref = matrix["none", method, "fp32", 1, 1]
    for key, r in sorted(matrix.items()):
        if key[1:3] != (method, "fp32") or "losses" not in r:
            continue
        assert r["dense"].keys() == ref["dense"].keys(), key
        for name, w in ref["dense"].items():
            torch.testing.assert_close(r["dense"][name], w, rtol=0, atol=WEIGHT_ATOL, msg=f"{key} {name}")
        for got, want in zip(r["memory"], ref["memory"]):
            torch.testing.assert_close(got, want, rtol=0, atol=WEIGHT_ATOL, msg=f"{key} memory")


def test_a_refused_combination_stops_the_launcher_with_one_error_line():
    r = run_cli([PY, "launchers/train.py", "--config", "configs/tiny/finetune_full.yaml", "dist.engine=deepspeed",
                 "dist.zero_stage=0", "precision=bf16"], timeout=120, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: dist.engine=deepspeed"), r.stderr
