"""The continual-learning benchmark end to end on the smoke config (a subprocess, ~10-60 s)."""
import json
import math
from pathlib import Path

import pytest

from smft_dist.config import ConfigError
from smft_dist.continual.benchmark import Bench, fact_order, load_continual_config
from smft_dist.continual.report import KEYS, METRICS, aggregate_orders, choose_shown
from tests.conftest import PY, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual") / "smoke"
    run_cli([PY, "launchers/continual.py", "--config", "configs/demo/smoke.yaml", "--out", str(out)])
    return out


def test_smoke_writes_a_well_formed_report(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert {"methods", "config", "sweeps", "pretrained", "checks"} <= set(report)
    assert set(report["methods"]) == {"sparse", "full", "lora", "sparse-tf"}  # smoke.yaml: ablations=true
    for name, m in report["methods"].items():
        assert set(KEYS) <= set(m), name
        assert all(math.isfinite(m[k]) for k in KEYS), (name, m)
        for k in ("learned_f1", "known_f1_before", "known_f1_after"):
            assert 0.0 <= m[k] <= 1.0, (name, k, m[k])
        assert m["steps"] == report["config"]["benchmark"]["n_new"]
        assert m["setting"] == report["sweeps"][name]["sweep"][m["setting_index"]]["setting"]
        assert m["why"]
    # every run starts from the same pretrained weights: the same "before" everywhere
    assert len({(m["known_f1_before"], m["heldout_nll_before"]) for m in report["methods"].values()}) == 1
    curve = report["sweeps"]["sparse"]["sweep"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 3, 6]  # eval.every=3 over 6 facts
    assert {"known_f1", "known_f1_memory_zeroed"} <= set(report["pretrained"])


def test_smoke_writes_markdown_and_plots(smoke_run):
    md = (smoke_run / "report.md").read_text()
    for name in ("sparse", "full", "lora", "Known-F1 drop", "Why these settings", "Memory ablation"):
        assert name in md
    for png in ("curves.png", "pareto.png"):
        data = (smoke_run / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), png
        assert f"]({png})" in md


def test_rerun_reuses_data_and_pretraining_over_two_fact_orders(smoke_run):
    """A second run into the same folder skips the benchmark, pretraining and df index; with
    fact_orders=2 every number shown is the mean of the two orders' runs."""
    mtime = (smoke_run / "pretrain" / "checkpoints" / "latest").stat().st_mtime
    r = run_cli([PY, "launchers/continual.py", "--config", "configs/demo/smoke.yaml", "--out", str(smoke_run),
                 "methods=[{name: sparse, method: sparse_memory, sweep: ['optim.memory_lr=30 selection.top_t=5']}]",
                 "target_method=sparse", "fact_orders=2"])
    assert "reusing the benchmark" in r.stderr
    assert (smoke_run / "pretrain" / "checkpoints" / "latest").stat().st_mtime == mtime
    report = json.loads((smoke_run / "report.json").read_text())
    assert set(report["methods"]) == {"sparse"}
    perms = report["fact_order_permutations"]
    assert len(perms) == 2 and perms[0] == list(range(6)) and sorted(perms[1]) == perms[0] != perms[1]
    m, entry = report["methods"]["sparse"], report["sweeps"]["sparse"]["sweep"][0]
    assert len(m["per_order"]) == len(entry["orders"]) == 2
    for k in METRICS:
        assert m[k] == pytest.approx(sum(o[k] for o in m["per_order"]) / 2), k
    assert m["steps"] == 6 and [p["step"] for p in entry["curve"]] == [0, 3, 6]
    assert "over 2 orders of the new facts" in (smoke_run / "report.md").read_text()


def test_fact_orders_keep_facts_and_questions_together():
    assert fact_order(10, 0, seed=0) == list(range(10))  # order 0: the benchmark's own
    perm = fact_order(10, 1, seed=0)
    assert sorted(perm) == list(range(10)) and perm != list(range(10))
    assert perm == fact_order(10, 1, seed=0) != fact_order(10, 2, seed=0) != fact_order(10, 1, seed=1)
    bench = Bench(None, [], [{"q": i} for i in range(10)], [{"fact": i} for i in range(10)], [], None)
    moved = bench.reordered(perm)
    assert [q["q"] for q in moved.new_qa] == [b["fact"] for b in moved.fact_batches] == perm
    assert [q["q"] for q in bench.new_qa] == list(range(10))  # the original is left as it was


def test_aggregate_orders_means_std_and_curve():
    def run(f1, drop):
        return {**{k: 0.5 for k in METRICS}, "learned_f1": f1, "known_f1_drop_pct": drop, "steps": 4,
                "wall_s": 1.0, "curve": [{"step": 0, "learned_f1": 0.0, "known_f1": 1.0, "heldout_nll": 2.0},
                                          {"step": 4, "learned_f1": f1, "known_f1": 1.0, "heldout_nll": 2.0}]}
    agg = aggregate_orders([run(0.2, 10.0), run(0.4, 20.0), run(0.6, 0.0)])
    assert agg["learned_f1"] == pytest.approx(0.4) and agg["std"]["learned_f1"] == pytest.approx(0.2)
    assert agg["known_f1_drop_pct"] == pytest.approx(10.0) and agg["std"]["known_f1_drop_pct"] == pytest.approx(10.0)
    assert agg["steps"] == 4 and agg["wall_s"] == 3.0 and len(agg["orders"]) == 3
    assert [p["learned_f1"] for p in agg["curve"]] == pytest.approx([0.0, 0.4])
    assert aggregate_orders([run(0.3, 5.0)])["std"]["learned_f1"] == 0.0


def _runs(*pairs):
    return {"sweep": [{"learned_f1": f, "known_f1_drop_pct": d} for f, d in pairs]}


def test_matched_learning_choice():
    sweeps = {"full": _runs((0.2, 10.0), (0.6, 50.0), (0.3, 80.0), (0.6, 60.0)),  # target 0.6
              "sparse": _runs((0.5, 5.0), (0.7, 20.0), (0.65, 10.0)),  # 0.7 and 0.65 reach: least forgetting
              "lora": _runs((0.1, 5.0), (0.3, 30.0), (0.3, 20.0))}  # none reaches: best learning, less forgetting
    shown = choose_shown(sweeps, "full")
    assert shown["full"][0] == 1 and "matched" in shown["full"][1]
    assert shown["sparse"][0] == 2
    assert shown["lora"][0] == 2 and "NOT matched" in shown["lora"][1]


def test_config_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="command-line override.*bogus"):
        load_continual_config("configs/demo/smoke.yaml", ["bogus=1"])
    with pytest.raises(ConfigError, match="method 'full' setting.*optim.lrr"):
        load_continual_config("configs/demo/smoke.yaml", ["methods.1.sweep=[optim.lrr=1]"])
    with pytest.raises(ConfigError, match="fact_orders=0 must be >= 1"):
        load_continual_config("configs/demo/smoke.yaml", ["fact_orders=0"])
    with pytest.raises(ConfigError, match="target_method"):
        load_continual_config("configs/demo/smoke.yaml", ["target_method=nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark:\n  n_knwn: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*n_knwn"):
        load_continual_config(bad)


def test_retrofit_configs_load_and_dense_init_needs_the_retrofit_path():
    from smft_dist.continual.benchmark import finetune_config

    for path in ("configs/demo/retrofit_cpu.yaml", "configs/demo/retrofit_smoke.yaml"):
        c = load_continual_config(path)
        assert c.retrofit.enabled and {m.name: m.init for m in c.methods}["full"] == "dense"
        by_name = {m.name: m for m in c.methods}
        dense = finetune_config(c, by_name["full"], by_name["full"].sweep[0], Path("/out"))
        memory = finetune_config(c, by_name["sparse"], by_name["sparse"].sweep[0], Path("/out"))
        assert dense.model.memory_layers == [] and dense.model.init_from == "/out/dense_pretrain/checkpoints"
        assert memory.model.memory_mode == "add" and memory.model.init_from == "/out/background_index/checkpoints"
    with pytest.raises(ConfigError, match="init='dense'.*retrofit.enabled"):
        load_continual_config("configs/demo/smoke.yaml", ["methods.1.init=dense"])


@pytest.mark.slow
def test_retrofit_smoke_starts_sparse_from_the_retrofit_and_full_from_the_dense_model(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from smft_dist.model import SmftForCausalLM

    out = tmp_path / "retrofit"
    run_cli([PY, "launchers/continual.py", "--config", "configs/demo/retrofit_smoke.yaml", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    pre, methods = report["pretrained"], report["methods"]
    assert pre["retrofit"]["mode"] == "add" and len(pre["retrofit"]["mean_abs_gate"]) == 1
    assert pre["retrofit"]["mean_abs_gate"][0] > 0  # continued pretraining opened the zero-init gate
    assert methods["full"]["heldout_nll_before"] == pre["dense"]["heldout_nll"]  # full FT: the dense model
    assert methods["sparse"]["heldout_nll_before"] == pre["heldout_nll"]  # sparse: the retrofitted one
    assert "Retrofit path" in (out / "report.md").read_text()
    # the retrofit itself (before continued pretraining) computes exactly what the dense model does
    dense, smft = LlamaForCausalLM.from_pretrained(out / "dense_hf"), SmftForCausalLM.from_pretrained(out / "retrofit_model")
    ids = torch.arange(3, 35).view(2, 16)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, smft(ids).logits)
