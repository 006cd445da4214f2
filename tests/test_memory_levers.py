"""smft_dist.bench.memory_levers: the properties it measures describe what the trainer does, on the
tiny pretrained model (tests/conftest.py) with the tiny synthetic benchmark's new facts."""
import json

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.bench.memory_levers import (Probe, answer_loss_batch, count_usage, jaccard_stats, learning_level,
                                           measure, seed_checks, spearman)
from smft_dist.config import load_config
from smft_dist.continual.benchmark import _grouped_batches
from smft_dist.distributed import init_distributed
from smft_dist.eval.qa import evaluate_qa, load_qa_jsonl
from smft_dist.train.trainer import build_run
from tests.conftest import ROOT, latest_dir

SPARSE = ROOT / "configs" / "tiny" / "finetune_sparse.yaml"
PARAPHRASES = 64  # smft-data synthetic's default: the tiny benchmark's texts per new fact


def make_probe(tiny_data, tiny_pretrained, *overrides):
    from transformers import AutoTokenizer

    cfg = load_config(SPARSE, [f"model.init_from={tiny_pretrained}", f"data.batch_size={PARAPHRASES}",
                               "optim.memory_lr_scale=per_token", *overrides])
    trainer = build_run(cfg, init_distributed(cfg.dist))
    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    return Probe(trainer, tok, 32, lambda model, qa: evaluate_qa(model, tok, [qa], 1, 3)["f1"])


@pytest.fixture(scope="module")
def facts(tiny_data):
    """(batches, qa) of the tiny benchmark's new facts, as the finetuning stream feeds them."""
    return _grouped_batches(tiny_data / "new_facts", PARAPHRASES, "fact"), load_qa_jsonl(tiny_data / "eval" / "new_qa.jsonl")


def test_slot_usage_counts_the_saved_index(tiny_pretrained):
    df = load_file(str(latest_dir(tiny_pretrained) / "df" / "layer2.safetensors"))["df"]
    usage = count_usage(df)
    assert 0 < usage["used_fraction"] <= 1
    assert usage["used_fraction"] == int((df > 0).sum()) / df.numel()
    assert 0 < usage["entropy"] <= 1 and usage["max"] == int(df.max())
    # a uniform count over every slot is the maximum entropy, 1; one used slot the minimum, 0
    assert count_usage(torch.ones(16, dtype=torch.int32))["entropy"] == pytest.approx(1.0, abs=1e-12)
    assert count_usage(torch.tensor([0, 5, 0, 0]))["entropy"] == 0.0


def test_a_fact_is_its_own_known_fact(tiny_data, tiny_pretrained, facts):
    """Measured with the new facts' own batches as the known facts, each fact's selected rows are all
    among the known top-t rows: the forward-only ranking equals the trainer's selection. With other
    facts as the known ones the share is lower; a fact's set overlaps itself fully, another less."""
    batches, qa = facts
    probe = make_probe(tiny_data, tiny_pretrained)
    own = measure(probe, batches[:3], qa[:3], batches[:3])
    assert own["selected_in_known_top"] == 1.0 and own["selected_in_known_read"] == 1.0
    others = measure(probe, batches[:3], qa[:3], batches[3:6])
    assert others["selected_in_known_top"] < 1.0
    repeated = measure(probe, [batches[0], batches[0]], [qa[0], qa[0]], batches[3:4])
    assert repeated["new_new_jaccard"] == 1.0
    assert own["new_new_jaccard"] < 1.0
    assert jaccard_stats(torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool))["mean"] == pytest.approx(1 / 3)


def test_the_step_gradient_is_the_update_and_is_undone(tiny_data, tiny_pretrained, facts):
    """fact_step's gradient is what masked SGD applied (|V_after - V_before| / lr over the rows it
    changed: the selected ones with a nonzero gradient); afterwards every row is back, so the next fact
    starts from the pretrained model (the same step measures the same)."""
    batches, qa = facts
    probe = make_probe(tiny_data, tiny_pretrained)
    lr = probe.trainer.cfg.optim.memory_lr
    probe.trainer.train_step(batches[1])
    delta_ND = probe.table.weight.detach() - probe.start_ND
    changed = delta_ND.abs().sum(1).nonzero().squeeze(1)
    probe.restore()
    first = probe.fact_step(batches[1], qa[1])
    assert torch.equal(probe.table.weight.detach(), probe.start_ND)
    # the step wrote selected rows only: all but those with an exactly zero gradient
    assert first["selected"].numel() == probe.trainer.cfg.selection.top_t
    assert bool(torch.isin(changed, first["selected"]).all())
    assert changed.numel() == round(first["selected"].numel() * (1 - first["zero_grad_fraction"]))
    # V_after = V - lr g in fp32: |delta| carries the rounding of V (~6e-8 |V|, |V| ~ 1-10) per element,
    # far below 1e-4 of lr |g| (|g| ~ 1 per row here): rel 1e-4 is loose for rounding, tight for a wrong scale
    assert first["grad_norm"] > 0
    assert float(delta_ND.norm()) / lr == pytest.approx(first["grad_norm"], rel=1e-4)
    again = probe.fact_step(batches[1], qa[1])
    assert again["answer_loss_before"] == first["answer_loss_before"] and again["grad_norm"] == first["grad_norm"]
    assert first["answer_loss_before"] == probe.answer_loss(answer_loss_batch(probe.tokenizer, 32, qa[1]))
    assert first["answer_loss_after"] != first["answer_loss_before"]
    assert 0 <= first["answer_read_share"] <= 1 and 0 <= first["prompt_read_share"] <= 1


def test_gradient_is_in_per_token_units(tiny_data, tiny_pretrained, facts):
    """per_token scales the mean-loss gradient by the batch's label tokens, exactly (one float multiply
    of the same accumulated rows: relative error ~1e-7)."""
    batches, qa = facts
    per_token = make_probe(tiny_data, tiny_pretrained).fact_step(batches[2], qa[2])
    mean = make_probe(tiny_data, tiny_pretrained, "optim.memory_lr_scale=mean").fact_step(batches[2], qa[2])
    labels = int((batches[2]["labels"][:, 1:] != -100).sum())
    assert per_token["grad_norm"] == pytest.approx(labels * mean["grad_norm"], rel=1e-5)


def test_a_small_step_lowers_its_own_loss(tiny_data, tiny_pretrained, facts):
    """Gradient descent on the selected rows: at a small lr (per-token 1e-3, ~1e-3 x |g|^2 / labels ~
    1e-4 off a loss of ~3, where fp32 noise is ~1e-6) the batch's own loss falls; restored, it is back."""
    batches, _ = facts
    probe = make_probe(tiny_data, tiny_pretrained, "optim.memory_lr=1e-3")
    before = probe.answer_loss(batches[0])
    probe.trainer.train_step(batches[0])
    after = probe.answer_loss(batches[0])
    probe.restore()
    assert after < before and probe.answer_loss(batches[0]) == before


def test_level_and_correlation(tmp_path):
    sweep = [{"setting": "optim.memory_lr=1 selection.top_t=100", "learned_f1": 0.2, "known_f1_drop_pct": 2.0},
             {"setting": "optim.memory_lr=3 selection.top_t=100", "learned_f1": 0.3, "known_f1_drop_pct": 5.0},
             {"setting": "optim.memory_lr=10 selection.top_t=100", "learned_f1": 0.5, "known_f1_drop_pct": 5.1},
             {"setting": "optim.memory_lr=3 selection.top_t=auto", "learned_f1": 0.4, "known_f1_drop_pct": 1.0}]
    report = {"pretrained": {"0": {"memory": {"known_f1": 0.9, "known_f1_memory_zeroed": 0.6, "facts_f1": 0.05}}},
              "tasks": {"facts": {"sweeps": {"sparse": {"sweep": sweep}}}}}
    level = learning_level(json.loads(json.dumps(report)))
    # 0.5 forgets 5.1% (over budget), auto is not a fixed t: the level is 0.3 at exactly 5.0%
    assert (level["level"], level["level_drop_pct"], level["ref_learned_f1"]) == (0.3, 5.0, 0.2)
    assert level["zeroing_cost"] == pytest.approx(0.3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_seed_checks_pass_only_when_every_seed_and_the_mean_do():
    def row(seed, steps, level):
        return {"seed": seed, "pretrain_steps": steps, "level": level, "level_setting": "s", "level_drop_pct": 4.0}

    short = [row(0, 1000, 0.9)]  # one seed of a length: no report for it
    weak = [row(0, 3000, 0.48), row(1, 3000, 0.44), row(2, 3000, 0.60), row(3, 3000, 0.60)]  # mean 0.53, seed 1 < 0.45
    strong = [row(s, 6000, 0.5) for s in range(4)]
    checks = seed_checks(short + weak + strong)
    assert set(checks) == {"pretrain.steps=3000", "pretrain.steps=6000"}
    lines = checks["pretrain.steps=3000"]["lines"]
    assert not checks["pretrain.steps=3000"]["pass"] and lines[1].startswith("FAIL: seed 1")
    assert lines[-1].startswith("PASS: mean over 4 seeds 0.530")
    assert checks["pretrain.steps=6000"]["pass"]
    assert seed_checks([row(s, 6000, 0.48) for s in range(4)])["pretrain.steps=6000"]["lines"][-1].startswith("FAIL: mean")
