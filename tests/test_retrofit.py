"""Retrofit a dense LlamaForCausalLM into an smft model, train it on 2 ranks, export it back to
plain transformers (remote code, without smft_dist importable)."""
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from smft_dist.model import SmftForCausalLM
from smft_dist.model.retrofit import RetrofitError, load_dense, retrofit
from tests.conftest import PY, ROOT, checkpoint_tensors, latest_dir, run_cli

MEMORY = dict(n_keys=16, heads=2, knn=4, k_dim=16, value_dim=32)
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launchers/train.py"]


def small_llama(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def dense_dir(tiny_data, tmp_path_factory):
    """A random LlamaForCausalLM (GQA, llama3 rope) with the tiny data's tokenizer, saved locally."""
    out = tmp_path_factory.mktemp("dense") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(small_llama()).save_pretrained(out)
    for f in (tiny_data / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_add_mode_logits_equal_the_dense_models_bitwise(dense_dir, tmp_path):
    out = retrofit(dense_dir, tmp_path / "add", [1], mode="add", **MEMORY)
    dense = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    smft = SmftForCausalLM.from_pretrained(out).eval()
    assert smft.config.memory_mode == "add" and smft.config.rope_parameters == dense.config.rope_parameters
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the memory makes no lookups there
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            assert torch.equal(smft(ids, **kw).logits, dense(ids, **kw).logits)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(smft.generate(ids[:1], **gen), dense.generate(ids[:1], **gen))
        smft.model.layers[1].mlp.memory_gate.fill_(0.5)  # the memory is wired in: a moved gate moves the logits
        assert not torch.equal(smft(ids).logits, dense(ids).logits)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_replace_mode_copies_every_non_memory_weight_bitwise(dense_dir, tmp_path):
    out = retrofit(dense_dir, tmp_path / "replace", [0, 2], mode="replace", **MEMORY)
    src = load_file(str(dense_dir / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    dropped = {k for k in src if k.startswith(("model.layers.0.mlp.", "model.layers.2.mlp."))}
    assert len(dropped) == 6  # gate/up/down of two layers
    for k in src.keys() - dropped:
        assert torch.equal(got[k], src[k]), k
    memory = {k for k in got if k.startswith(("model.layers.0.mlp.", "model.layers.2.mlp."))}
    assert got.keys() - memory == src.keys() - dropped  # nothing else added or lost
    assert {k.split("mlp.")[1] for k in memory} == {"keys.keys", "keys.query.weight", "keys.query.bias",
                                                     "values.weight", "w1.weight", "w2.weight"}
    assert SmftForCausalLM.from_pretrained(out).config.memory_mode == "replace"


@pytest.mark.parametrize("make, field", [
    (lambda: LlamaForCausalLM(small_llama(attention_bias=True)), "attention_bias"),
    (lambda: LlamaForCausalLM(small_llama(mlp_bias=True)), "mlp_bias"),
    (lambda: MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2, sliding_window=16)),
     "sliding_window"),
])
def test_unrepresentable_architectures_fail_naming_the_field(make, field, tmp_path):
    make().save_pretrained(tmp_path / "src")
    with pytest.raises(RetrofitError, match=field):
        load_dense(tmp_path / "src")


def test_tie_mismatch_fails_and_the_cli_prints_one_error_line(tmp_path):
    LlamaForCausalLM(small_llama(tie_word_embeddings=False)).save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    from smft_dist.model.retrofit import main

    assert main(["--model", str(tmp_path / "src"), "--layers", "1", "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(RetrofitError, match="tie_word_embeddings"):
        load_dense(tmp_path / "src")


@pytest.mark.slow
def test_dense_folder_as_init_from_fails_with_the_retrofit_hint(dense_dir, tiny_data, tmp_path):
    r = run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={tmp_path}",
                 f"data.train={tiny_data}/pretrain", f"model.init_from={dense_dir}"], check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "smft-retrofit" in r.stderr


def _load_and_generate_without_smft_dist(folder, cwd):
    """In a fresh interpreter whose sys.path lacks the project (and whose cwd is not the repo):
    load with trust_remote_code, generate, and return the logits of a fixed input."""
    code = f"""
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if 'smft_dist' not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if p.startswith(sys.prefix) or not p.startswith({str(ROOT)!r})]  # keep the venv
for name in [m for m in sys.modules if 'editable' in m and 'smft' in m]:
    del sys.modules[name]
assert importlib.util.find_spec('smft_dist') is None, 'smft_dist is still importable'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith('transformers_modules'), type(m).__module__
assert 'smft_dist' not in sys.modules
tok = AutoTokenizer.from_pretrained({str(folder)!r})
x = tok(['where was'], return_tensors='pt')
out = m.generate(**x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
assert out.shape[1] == x['input_ids'].shape[1] + 5
with torch.no_grad():
    torch.save({{'ids': x['input_ids'], 'logits': m(x['input_ids']).logits}}, {str(cwd / 'logits.pt')!r})
print('ok')
"""
    r = subprocess.run([PY, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    return torch.load(cwd / "logits.pt")


@pytest.mark.slow
def test_retrofit_pretrain_index_finetune_on_two_ranks_then_export(dense_dir, tiny_data, tmp_path):
    model_dir = tmp_path / "model"
    r = run_cli([PY, "-m", "smft_dist.model.retrofit", "--model", str(dense_dir), "--out", str(model_dir),
                 "--layers", "1", "--mode", "add", "--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "16",
                 "--value-dim", "32"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["mode"] == "add"
    common = ["data.seq_len=32", "data.batch_size=8", f"data.background={tiny_data}/background",
              "logging.progress=false", "checkpoint.every=0"]

    def stage(recipe):  # the retrofit's model section first, then the recipe
        return [*TORCHRUN, "--config", str(model_dir / "model.yaml"), "--config", f"configs/retrofit/{recipe}.yaml",
                *common]

    run_cli([*stage("continue_pretrain"), "steps=6", "optim.warmup_steps=0", "optim.lr=1e-2",
             f"data.train={tiny_data}/pretrain", f"out_dir={tmp_path}/cpt"])
    run_cli([*stage("background_index"), "selection.background_batches=4",
             f"model.init_from={tmp_path}/cpt/checkpoints", f"out_dir={tmp_path}/bg"])
    run_cli([*stage("finetune_sparse"), "steps=3", "selection.top_t=20",
             "optim.memory_lr=50", "optim.memory_lr_scale=mean", f"model.init_from={tmp_path}/bg/checkpoints", f"data.train={tiny_data}/new_facts",
             "data.batch_size=32", f"out_dir={tmp_path}/ft"])  # 32 x 2 ranks = one fact's 64 paraphrases per step

    src = load_file(str(dense_dir / "model.safetensors"))
    cpt = checkpoint_tensors(latest_dir(tmp_path / "cpt/checkpoints"))
    ft = checkpoint_tensors(latest_dir(tmp_path / "ft/checkpoints"))
    for k in src:  # memory-only continued pretraining: every dense weight (the kept FFN too) is untouched
        assert torch.equal(cpt[k], src[k]) and torch.equal(ft[k], src[k]), k
    gate = "model.layers.1.mlp.memory_gate"
    assert cpt[gate].abs().max() > 0  # the zero-init gate opened
    assert not torch.equal(cpt["model.layers.1.mlp.memory.keys.query.weight"],
                           load_file(str(model_dir / "model.safetensors"))["model.layers.1.mlp.memory.keys.query.weight"])
    for k in cpt.keys() - {"memory"}:  # sparse finetuning moved no dense or memory-layer weight...
        assert torch.equal(ft[k], cpt[k]), k
    changed = (ft["memory"] != cpt["memory"]).any(dim=1).sum().item()
    assert 0 < changed <= 3 * 20  # ...and at most top_t value rows per step
    lines = [json.loads(l) for l in (tmp_path / "ft/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all(l["rows_updated"] <= 20 for l in lines)

    hf = tmp_path / "hf"
    run_cli([PY, "-m", "smft_dist.train.export", str(tmp_path / "ft/checkpoints"), "--out", str(hf),
             "--tokenizer", str(tiny_data / "tokenizer")])
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_smft.SmftForCausalLM" and cfg["memory_mode"] == "add"
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (t.pad_token_id, t.bos_token_id,
                                                                              t.eos_token_id)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    got = _load_and_generate_without_smft_dist(hf, outside)
    from smft_dist.checkpoint.model import load_checkpoint_model

    ref, _ = load_checkpoint_model(tmp_path / "ft/checkpoints")
    with torch.no_grad():
        assert torch.equal(ref.eval()(got["ids"]).logits, got["logits"])
