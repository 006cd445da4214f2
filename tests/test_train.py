"""Single-process runs of the real loop: resume continues exactly; export loads and generates."""
import json

import torch

from tests.conftest import PY, ROOT, checkpoint_tensors, data_overrides, latest_dir, run_cli


def test_resume_auto_continues_at_step_and_data_position(tiny_data, tmp_path):
    common = ["--config", "configs/tiny/pretrain.yaml", "optim.schedule=constant", "optim.warmup_steps=0",
              "checkpoint.every=0", *data_overrides(tiny_data)]
    run_cli([PY, "launchers/train.py", *common, f"out_dir={tmp_path}/whole", "steps=8"])
    run_cli([PY, "launchers/train.py", *common, f"out_dir={tmp_path}/split", "steps=4"])
    r = run_cli([PY, "launchers/train.py", *common, f"out_dir={tmp_path}/split", "steps=8"])
    assert "at step 4" in r.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    whole_losses = [json.loads(l)["loss"] for l in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    split_losses = [json.loads(l)["loss"] for l in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert whole_losses == split_losses  # same batches in the same order, same weights
    step_dir = latest_dir(tmp_path / "split/checkpoints")
    a, b = checkpoint_tensors(latest_dir(tmp_path / "whole/checkpoints")), checkpoint_tensors(step_dir)
    assert step_dir.name == "step_8" and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretraining_lowers_the_loss(tiny_data, tmp_path):
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={tmp_path}", "steps=30",
             "logging.tensorboard=true", *data_overrides(tiny_data)])
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert {"loss", "tokens", "tokens_per_s", "lr", "rows_updated", "peak_mem_mb"} <= records[-1].keys()
    assert (tmp_path / "config.yaml").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


def test_export_loads_in_fresh_process_and_generates(tiny_pretrained, tiny_data, tmp_path):
    run_cli([PY, "-m", "smft_dist.train.export", str(tiny_pretrained), "--out", str(tmp_path / "hf"),
             "--tokenizer", str(tiny_data / "tokenizer")])
    assert (tmp_path / "hf" / "background_df" / "layer2.safetensors").is_file()
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import smft_dist.model
from smft_dist.checkpoint.model import load_checkpoint_model
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r})
x = tok(["where was"], return_tensors="pt")
out = m.generate(**x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
assert out.shape[1] == x["input_ids"].shape[1] + 5
ref, _ = load_checkpoint_model({str(tiny_pretrained)!r})
assert torch.equal(ref(x["input_ids"]).logits, m(x["input_ids"]).logits)
print("ok")
"""
    r = run_cli([PY, "-c", code])
    assert r.stdout.strip().endswith("ok")


def test_fresh_model_is_fully_initialised_without_a_full_table_copy():
    from smft_dist.config import load_config
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_fresh_model

    cfg = load_config(ROOT / "configs/model/tiny.yaml")
    model, tables = build_fresh_model(cfg, init_distributed(cfg.dist))
    layer = model.memory_layers()[0]
    assert layer.values is tables[0] and tables[0].weight.device.type != "meta"
    # U(+-1/sqrt(k_dim)) keys, N(0, D^-1/2) values, N(0, 0.02) linears: nothing left as to_empty's garbage
    torch.testing.assert_close(layer.keys.keys.std().item(), (1 / 64**0.5) / 3**0.5, atol=3e-3, rtol=0)
    torch.testing.assert_close(tables[0].weight.std().item(), 128**-0.5, atol=2e-3, rtol=0)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 2, name
        if name.endswith("proj.weight") or name.endswith("query.weight"):
            torch.testing.assert_close(p.std().item(), 0.02, atol=2e-3, rtol=0, msg=name)


def test_broken_latest_pointer_fails_instead_of_starting_afresh(tiny_data, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_9")  # the step folder was deleted by hand
    r = run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={tmp_path}", "steps=2",
                 *data_overrides(tiny_data)], check=False)
    assert r.returncode == 2 and "names step_9" in r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
