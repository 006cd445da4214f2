"""`smft-inspect --plan`: its parameter-derived figures equal the bytes of real tensors built on the
meta device (the model, PEFT's adapters, AdamW's state after a step, the memory shard and its
optimizer's row state and its growth), and the paper model's plan fits an 80 GB GPU."""
import json
import math

import pytest
import torch

from smft_dist.config import load_config
from smft_dist.memory.plan import RowShardPlan
from smft_dist.memory.values import DTYPES, ValueTable
from smft_dist.model.memory_plan import build_meta_model, memory_plan
from smft_dist.optim import RowSparseAdamW, build_memory_optimizer
from tests.conftest import ROOT
from tests.test_row_state import PeakBytes

WORLD = MP = 4


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured(cfg) -> dict:
    """The plan's parameter-derived parts, from tensors on the meta device."""
    model = build_meta_model(cfg)
    values = {id(layer.values.weight) for layer in model.memory_layers()}
    lora = cfg.mode == "finetune" and cfg.method == "lora"
    sparse = cfg.mode == "finetune" and cfg.method == "sparse_memory"
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                 target_modules=list(cfg.lora.targets)))
    held = [p for p in model.parameters() if id(p) not in values]
    trainable = [] if sparse else [p for p in held if p.requires_grad]
    ds_bf16 = cfg.dist.engine == "deepspeed" and cfg.precision == "bf16"
    fsdp = cfg.dist.engine == "fsdp2"
    zero = cfg.dist.zero_stage if cfg.dist.engine == "deepspeed" else 0
    out = {}
    if fsdp:
        block = list(build_meta_model(cfg).model.layers[0].parameters())
        compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        out["dense_weights"] = math.ceil(nbytes(held) / WORLD) + 2 * nbytes(p.to(compute) for p in block)
    else:
        out["dense_weights"] = nbytes(p.to(torch.bfloat16) if ds_bf16 else p for p in held)
    grads = [torch.empty_like(p, dtype=torch.bfloat16 if ds_bf16 else torch.float32) for p in trainable]
    out["dense_grads"] = math.ceil(nbytes(grads) / (WORLD if fsdp or zero >= 2 else 1))
    state = 0
    if trainable:
        opt = torch.optim.AdamW(trainable)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        state = nbytes(t for s in opt.state.values() for k, t in s.items() if k != "step")
        state += nbytes(trainable) if ds_bf16 else 0  # DeepSpeed's fp32 master weights
    out["dense_optimizer"] = math.ceil(state / (WORLD if fsdp or zero >= 1 else 1))
    # rank 0's memory shard (the largest) and its optimizer's row state, grown one row at a time
    # to every row it may update (the path whose last growth starts from the largest old capacity)
    N, D = cfg.model.memory_n_keys ** 2, cfg.model.memory_value_dim
    table = ValueTable(N, D, *RowShardPlan(N, MP).bounds(0), dtype=DTYPES[cfg.model.memory_value_dtype],
                       device="meta")
    out["memory_values"] = nbytes([table.weight])
    rows = table.row_end - table.row_start
    opt = build_memory_optimizer([table], cfg.optim) if sparse else RowSparseAdamW([table], 1e-3)
    row_state = opt.states[0]
    out["memory_optimizer"] = out["memory_optimizer_growth"] = 0
    if row_state.specs and not lora:  # LoRA freezes the memory
        peak = PeakBytes(row_state)
        for n in range(1, (min(rows, cfg.steps * cfg.selection.top_t) if sparse else rows) + 1):
            row_state._reserve(n)
        kept = nbytes([*row_state._bufs.values(), row_state._rows_S])
        out["memory_optimizer"] = kept + rows * 4  # + the slot map
        out["memory_optimizer_growth"] = peak.peak - kept
    return out


@pytest.mark.parametrize("overrides", [
    ["mode=pretrain", "dist.engine=deepspeed", "dist.zero_stage=1", "precision=bf16", "model.memory_value_dtype=bfloat16"],
    ["mode=pretrain", "dist.engine=fsdp2", "precision=bf16"],
    ["mode=pretrain", "dist.engine=deepspeed", "dist.zero_stage=1", "model.memory_n_keys=100"],
    ["mode=finetune", "method=full", "dist.engine=deepspeed", "dist.zero_stage=2"],
    ["mode=finetune", "method=lora", "dist.engine=deepspeed", "dist.zero_stage=2", "precision=bf16"],
    ["mode=finetune", "method=sparse_memory", "model.memory_value_dtype=bfloat16", "optim.momentum=0.9", "steps=3",
     "selection.top_t=100"],
], ids=["pretrain-zero1-bf16", "pretrain-fsdp2", "pretrain-2500-row-shard", "full-zero2", "lora-zero2",
        "sparse-bf16-momentum"])
def test_plan_parts_equal_meta_tensor_bytes(overrides):
    cfg = load_config(ROOT / "configs/model/tiny.yaml", overrides)
    plan = memory_plan(cfg, WORLD, MP)
    want = measured(cfg)
    assert {k: plan["parts"][k] for k in want} == want
    assert plan["total_bytes"] == sum(plan["parts"].values()) > sum(want.values())  # + activations, logits


def test_activation_checkpointing_shrinks_the_activation_estimate():
    cfg = load_config(ROOT / "configs/paper/pretrain_1p3b.yaml")
    ckpt = load_config(ROOT / "configs/paper/pretrain_1p3b.yaml", ["model.activation_checkpointing=true"])
    full, recomputed = memory_plan(cfg, 8, 8)["parts"], memory_plan(ckpt, 8, 8)["parts"]
    assert recomputed["activations"] < full["activations"] / 2
    assert {k: v for k, v in recomputed.items() if k != "activations"} == {k: v for k, v in full.items() if k != "activations"}


def test_paper_model_plan_fits_an_80gb_gpu(capsys):
    from smft_dist.model.inspect import main

    assert main(["--config", str(ROOT / "configs/model/smft_1p3b.yaml"), "--plan", "--mp", "8", "--precision", "bf16",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["settings"]["precision"] == "bf16" and plan["settings"]["world"] == 8
    assert 10e9 < plan["total_bytes"] < 80e9
