"""A Hugging Face folder stored in bf16 (as most public Llamas, and smft-retrofit's output from one)
trains on fp32 weights: the update of one small AdamW step is the fp32 update, not rounded away."""
import pytest
import torch

from smft_dist.config import load_config
from smft_dist.distributed import init_distributed
from smft_dist.train.trainer import build_fresh_model, build_run
from tests.conftest import ROOT
from tests.test_paper_scale import SMALL, batch


def finetune_config(*overrides):
    return load_config(ROOT / "configs/tiny/finetune_full.yaml",
                       SMALL + ["optim.lr=1e-5", "optim.memory_lr=1e-5", "optim.weight_decay=0.0", *overrides])


def save_folder(model, out, dense_dtype):
    """`model` saved as an HF folder with its dense weights in `dense_dtype` (values as configured)."""
    values = {id(layer.values.weight) for layer in model.memory_layers()}
    for p in model.parameters():
        if id(p) not in values:
            p.data = p.data.to(dense_dtype)
    model.save_pretrained(out)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_bf16_folder_trains_fp32_weights(precision, tmp_path):
    cfg = finetune_config("model.init_from=null")
    model, _ = build_fresh_model(cfg, init_distributed(cfg.dist))
    save_folder(model, tmp_path / "bf16", torch.bfloat16)
    save_folder(model, tmp_path / "fp32", torch.float32)  # the same values (bf16 -> fp32 is exact)
    before, after = {}, {}
    for stored in ("bf16", "fp32"):
        cfg = finetune_config(f"model.init_from={tmp_path / stored}", f"precision={precision}")
        tr = build_run(cfg, init_distributed(cfg.dist))
        assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
        before[stored] = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr.train_step(batch(0))
        after[stored] = tr.model.state_dict()
    # Same fp32 weights, same batch, same fp32 step: identical. Before the fix the bf16 folder trained
    # bf16 weights: an update of ~lr = 1e-5 is under half an ulp of a weight above ~2.6e-3 in bf16
    # (ulp 2^-16 there), so most of it was rounded away.
    for k, v in after["fp32"].items():
        assert torch.equal(after["bf16"][k], v), k
    w = "model.layers.0.self_attn.q_proj.weight"
    moved = (after["bf16"][w] != before["bf16"][w]).float().mean()
    assert moved > 0.9, f"only {moved:.1%} of {w} moved"  # AdamW's first step moves every element by ~lr
