import json
import subprocess
import sys

import pytest
import torch

from smft_dist.config import load_config
from smft_dist.model import SmftConfig, SmftForCausalLM
from smft_dist.model.inspect import inspect_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["model.memory_n_keys=16", "model.memory_knn=4"])
    return SmftForCausalLM(SmftConfig.from_model_config(cfg.model))


def test_memory_layer_replaces_ffn():
    m = tiny_model()
    from smft_dist.memory import ProductKeyMemory
    kinds = [type(layer.mlp).__name__ for layer in m.model.layers]
    assert kinds == ["LlamaMLP", "LlamaMLP", "ProductKeyMemory", "LlamaMLP"]
    assert isinstance(m.memory_layers()[0], ProductKeyMemory)


def test_save_load_round_trip_exact_in_fresh_process(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path / "hf")
    x = torch.randint(3, 512, (2, 9))
    torch.save({"x": x, "logits": m(x).logits.detach()}, tmp_path / "ref.pt")
    code = f"""
import torch
from transformers import AutoModelForCausalLM
import smft_dist.model  # registers the classes
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})
ref = torch.load({str(tmp_path / 'ref.pt')!r})
assert type(m).__name__ == 'SmftForCausalLM', type(m)
assert torch.equal(m(ref['x']).logits, ref['logits']), 'logits differ after reload'
out = m.generate(ref['x'][:1], max_new_tokens=4, do_sample=False)
assert out.shape == (1, 13), out.shape
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    m2 = SmftForCausalLM.from_pretrained(tmp_path / "hf")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_generate_with_left_padding_ignores_pad_tokens():
    m = tiny_model().eval()
    x = torch.randint(3, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    a = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    b = m.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(a[:, -3:], b[:, -3:])


def test_inspect_paper_model_on_meta():
    cfg = load_config(ROOT / "configs/model/smft_1p3b.yaml")
    info = inspect_model(cfg.model, mp=8)
    assert info["memory_slots"] == 1048576 and info["heads"] == 4 and info["knn"] == 32
    assert info["value_dim"] == 1024 and info["memory_layers"] == [12]
    assert 1.0e9 <= info["dense_params"] <= 1.8e9
    assert info["memory_value_params"] == 1048576 * 1024
    assert info["value_bytes_per_rank"] == 1048576 // 8 * 1024 * 2  # bf16


def test_inspect_cli_json():
    r = subprocess.run([sys.executable, "-m", "smft_dist.model.inspect", "--config", "configs/model/smft_1p3b.yaml",
                        "--mp", "8", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["memory_slots"] == 1048576 and info["mp"] == 8
