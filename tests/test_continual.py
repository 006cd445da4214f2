"""The continual-learning benchmark end to end on the smoke config (a subprocess, ~10-60 s)."""
import json
import math
from pathlib import Path

import pytest

from smft_dist.config import ConfigError
from smft_dist.continual.benchmark import Task, fact_order, load_continual_config
from smft_dist.continual.report import KEYS, METRICS, aggregate_runs, check_line, checks, choose_shown, task_checks, write_report
from tests.conftest import PY, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual") / "smoke"
    run_cli([PY, "launchers/continual.py", "--config", "configs/demo/smoke.yaml", "--out", str(out)])
    return out


def test_smoke_writes_a_well_formed_report(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert {"tasks", "config", "pretrained", "times"} <= set(report)
    pre = report["pretrained"]["0"]  # pretraining seed 0: the memory model and its dense twin
    assert {"known_f1", "known_f1_memory_zeroed", "facts_f1", "documents_f1"} <= set(pre["memory"])
    assert pre["dense"]["heldout_nll"] != pre["memory"]["heldout_nll"]
    want = {"facts": ({"sparse", "full", "lora", "full-dense", "sparse-tf"}, 6, [0, 3, 6]),  # smoke: ablations=true
            "documents": ({"sparse", "full", "full-dense"}, 4, [0, 2, 4])}  # 2 documents x 2 paragraphs
    for task, (names, steps, curve_steps) in want.items():
        t = report["tasks"][task]
        assert set(t["methods"]) == names and t["steps"] == steps
        for name, m in t["methods"].items():
            assert set(KEYS) <= set(m), name
            assert all(math.isfinite(m[k]) for k in KEYS), (name, m)
            for k in ("learned_f1", "known_f1_before", "known_f1_after"):
                assert 0.0 <= m[k] <= 1.0, (name, k, m[k])
            assert m["steps"] == steps and m["why"]
            assert m["setting"] == t["sweeps"][name]["sweep"][m["setting_index"]]["setting"]
            # every run starts from its init's pretrained weights: the memory model or the dense twin
            init = "dense" if name == "full-dense" else "memory"
            assert m["init"] == init and m["heldout_nll_before"] == pre[init]["heldout_nll"], (task, name)
            assert [p["step"] for p in t["sweeps"][name]["sweep"][0]["curve"]] == curve_steps
        assert t["checks"] and {c["status"] for c in t["checks"]} <= {"PASS", "FAIL", "INFO"}
    claims = " ".join(c["claim"] for c in report["tasks"]["facts"]["checks"])
    assert "zeroing the memory" in claims and "TF-IDF against TF-only" in claims


def test_document_chunks_teach_exactly_their_facts(smoke_run):
    """Chunk i's batch holds the augmentations of chunk i, and its QA pairs are the three facts it
    states: every document fact once, in the chunk whose texts carry its answer."""
    from smft_dist.continual.benchmark import load_bench

    c = load_continual_config("configs/demo/smoke.yaml")
    docs = load_bench(c, smoke_run / "data").tasks["documents"]
    doc_qa = [json.loads(line) for line in (smoke_run / "data" / "eval" / "doc_qa.jsonl").read_text().splitlines()]
    assert len(docs.batches) == 4 and [len(qs) for qs in docs.qa_per_step] == [3, 3, 3, 3]
    assert sorted(q["id"] for qs in docs.qa_per_step for q in qs) == sorted(q["id"] for q in doc_qa)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smoke_run / "data" / "tokenizer"))
    for batch, qs in zip(docs.batches, docs.qa_per_step):
        texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert len(texts) == c.benchmark.paraphrases
        assert all(q["answer"] in t.split() for q in qs for t in texts)
    assert docs.learned_qa(1) == docs.qa_per_step[0] and len(docs.learned_qa()) == 12


def test_smoke_writes_markdown_headline_and_plots(smoke_run):
    md = (smoke_run / "report.md").read_text()
    for name in ("sparse", "full", "lora", "Known-F1 drop", "Why these settings", "Memory ablation", "Fact learning",
                 "Document QA", "[dense twin]", "PASS", "FAIL"):
        assert name in md, name
    for task in ("facts", "documents"):
        for kind in ("curves", "pareto"):
            png = f"{task}_{kind}.png"
            data = (smoke_run / png).read_bytes()
            assert len(data) > 1000 and data.startswith(PNG), png
            assert f"]({png})" in md
    head = (smoke_run / "headline.md").read_text()
    assert "**Fact learning**" in head and "**Document QA**" in head and "| sparse-tf" not in head  # no ablation rows


def test_rerun_reuses_data_pretraining_and_finished_runs_over_two_orders(smoke_run):
    """A second run into the same folder skips the benchmark, pretraining, df index and every run it
    already finished; with fact_orders=2 every number shown is the mean of the two orders' runs."""
    first = json.loads((smoke_run / "report.json").read_text())
    mtime = (smoke_run / "seed0" / "pretrain" / "checkpoints" / "latest").stat().st_mtime
    r = run_cli([PY, "launchers/continual.py", "--config", "configs/demo/smoke.yaml", "--out", str(smoke_run),
                 "methods=[{name: sparse, method: sparse_memory, sweep: ['optim.memory_lr=30 selection.top_t=5']}]",
                 "target_method=sparse", "fact_orders=2"])
    assert "reusing the benchmark" in r.stderr
    # facts: 1 new setting x 2 orders; documents: 3 methods x 2 orders, of which order 0 is stored
    assert "8 finetuning runs: 3 stored" in r.stderr
    assert (smoke_run / "seed0" / "pretrain" / "checkpoints" / "latest").stat().st_mtime == mtime
    report = json.loads((smoke_run / "report.json").read_text())
    facts = report["tasks"]["facts"]
    assert set(facts["methods"]) == {"sparse"}
    perms = facts["permutations"]
    assert len(perms) == 2 and perms[0] == list(range(6)) and sorted(perms[1]) == perms[0] != perms[1]
    m, entry = facts["methods"]["sparse"], facts["sweeps"]["sparse"]["sweep"][0]
    assert len(m["per_run"]) == len(entry["runs"]) == 2 and [r["order"] for r in m["per_run"]] == [0, 1]
    for k in METRICS:
        assert m[k] == pytest.approx(sum(o[k] for o in m["per_run"]) / 2), k
    assert m["steps"] == 6 and [p["step"] for p in entry["curve"]] == [0, 3, 6]
    stored = first["tasks"]["documents"]["sweeps"]["sparse"]["sweep"][0]["runs"][0]
    assert report["tasks"]["documents"]["sweeps"]["sparse"]["sweep"][0]["runs"][0] == stored
    assert "1 pretraining seed x 2 orders" in (smoke_run / "report.md").read_text()


def test_fact_orders_keep_items_and_questions_together():
    assert fact_order(10, 0, seed=0) == list(range(10))  # order 0: the benchmark's own
    perm = fact_order(10, 1, seed=0)
    assert sorted(perm) == list(range(10)) and perm != list(range(10))
    assert perm == fact_order(10, 1, seed=0) != fact_order(10, 2, seed=0) != fact_order(10, 1, seed=1)
    task = Task("facts", [{"fact": i} for i in range(10)], [[{"q": i}] for i in range(10)], every=5)
    moved = task.reordered(perm)
    assert [q["q"] for q in moved.learned_qa()] == [b["fact"] for b in moved.batches] == perm
    assert [q["q"] for q in moved.learned_qa(3)] == perm[:3]
    assert [q["q"] for q in task.learned_qa()] == list(range(10))  # the original is left as it was


def test_aggregate_runs_means_std_and_curve():
    def run(f1, drop):
        return {**{k: 0.5 for k in METRICS}, "learned_f1": f1, "known_f1_drop_pct": drop, "steps": 4,
                "wall_s": 1.0, "curve": [{"step": 0, "learned_f1": 0.0, "known_f1": 1.0, "heldout_nll": 2.0},
                                          {"step": 4, "learned_f1": f1, "known_f1": 1.0, "heldout_nll": 2.0}]}
    agg = aggregate_runs([run(0.2, 10.0), run(0.4, 20.0), run(0.6, 0.0)])
    assert agg["learned_f1"] == pytest.approx(0.4) and agg["std"]["learned_f1"] == pytest.approx(0.2)
    assert agg["known_f1_drop_pct"] == pytest.approx(10.0) and agg["std"]["known_f1_drop_pct"] == pytest.approx(10.0)
    assert agg["steps"] == 4 and agg["wall_s"] == 3.0 and len(agg["runs"]) == 3
    assert [p["learned_f1"] for p in agg["curve"]] == pytest.approx([0.0, 0.4])
    assert aggregate_runs([run(0.3, 5.0)])["std"]["learned_f1"] == 0.0


def test_checks_apply_the_targets():
    def m(f1, drop, nll_after=2.0, matched=True, method="full"):
        return {"learned_f1": f1, "known_f1_drop_pct": drop, "heldout_nll_before": 2.0, "heldout_nll_after": nll_after,
                "matched": matched, "ablation": False, "method": method, "why": "-"}
    methods = {"sparse": m(0.55, 4.0, 2.015, method="sparse_memory"), "full": m(0.58, 20.0), "lora": m(0.3, 10.0, matched=False)}
    sweeps = {"sparse": {"method": "sparse_memory", "ablation": False,
                         "sweep": [{"learned_f1": 0.55, "known_f1_drop_pct": 4.0, "setting": "a"},
                                   {"learned_f1": 0.7, "known_f1_drop_pct": 30.0, "setting": "b"}]},
              "full": {"method": "full", "ablation": False, "sweep": [{"learned_f1": 0.58}, {"learned_f1": 0.62}]},
              "lora": {"method": "lora", "ablation": False, "sweep": [{"learned_f1": 0.3}]}}
    pre = {"memory": {"known_f1": 0.9, "known_f1_memory_zeroed": 0.5, "seeds": 2}}
    got = {c["claim"].split(":")[0]: c["status"] for c in checks("facts", methods, sweeps, "sparse", pre)}
    assert got == {"sparse within the forgetting budget": "INFO",  # setting a: 0.55 at 4%
                   "sparse within the forgetting budget learns at least half of the new facts": "PASS",
                   "sparse within the forgetting budget learns as well as full finetuning's best minus 0.05": "FAIL",  # 0.55 < 0.62 - 0.05
                   "sparse keeps held-out NLL at matched learning": "PASS", "full forgets at least 3x as much as sparse": "PASS",
                   "lora forgets at least 3x as much as sparse": "FAIL",  # 10% < 12%
                   "zeroing the memory after pretraining costs at least 0.3 known-fact F1": "PASS"}
    lora = next(c["claim"] for c in checks("facts", methods, sweeps, "sparse", pre) if c["claim"].startswith("lora"))
    assert "cannot reach the target learning" in lora
    docs = {c["claim"].split(":")[0]: c["status"] for c in checks("documents", methods, sweeps, "sparse", pre)}
    assert docs["sparse forgets less than full"] == docs["sparse forgets less than lora"] == "PASS" and len(docs) == 3
    # the level is judged on the best setting within the 5% budget, not on the best-learning one
    sweeps["sparse"]["sweep"][0]["learned_f1"] = 0.45
    got = {c["claim"]: c["status"] for c in checks("facts", methods, sweeps, "sparse", pre)}
    assert got["sparse within the forgetting budget learns at least half of the new facts: learned F1 0.450 (needs >= 0.5)"] == "FAIL"
    assert "sparse within the forgetting budget: `a`, its best-learning setting with a known-F1 drop <= 5%: learned F1 0.450 at a 4.0% drop" in got
    sweeps["sparse"]["sweep"][0]["known_f1_drop_pct"] = 6.0  # no setting within the budget: the shown one stands in
    got = {c["claim"].split(":")[0]: c["status"] for c in checks("facts", methods, sweeps, "sparse", pre)}
    assert got["sparse has a setting within the forgetting budget"] == "FAIL"
    assert got["sparse (shown setting) learns as well as full finetuning's best minus 0.05"] == "FAIL"


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



def _two_seed_facts(seed1_level: float) -> tuple[dict, dict]:
    """Fact-task sweeps over pretraining seeds 0 and 1, two orders each (learned F1 +-0.01 around
    the seed's level): sparse `a` learns 0.59 on seed 0 and `seed1_level` on seed 1 at a 4% drop,
    `b` 0.7 at 30%; full 0.48 at 40%. -> (sweeps, pretrained summaries), as benchmark.run makes them."""
    def run(seed: int, order: int, f1: float, drop: float) -> dict:
        known_after = 0.9 * (1 - drop / 100)
        return {"seed": seed, "order": order, "learned_f1": f1, "known_f1_before": 0.9, "known_f1_after": known_after,
                "known_f1_drop_pct": drop, "heldout_nll_before": 2.0, "heldout_nll_after": 2.0, "steps": 2, "wall_s": 1.0,
                "curve": [{"step": 0, "learned_f1": 0.0, "known_f1": 0.9, "heldout_nll": 2.0},
                          {"step": 2, "learned_f1": f1, "known_f1": known_after, "heldout_nll": 2.0}]}

    def setting(name: str, per_seed: dict) -> dict:
        runs = [run(seed, k, f1 + d, drop) for seed, (f1, drop) in per_seed.items() for k, d in enumerate((0.01, -0.01))]
        return {"setting": name, **aggregate_runs(runs)}

    entry = {"init": "memory", "overrides": [], "ablation": False}
    sweeps = {"sparse": {**entry, "method": "sparse_memory", "sweep": [setting("a", {0: (0.59, 4.0), 1: (seed1_level, 4.0)}),
                                                                       setting("b", {0: (0.7, 30.0), 1: (0.7, 30.0)})]},
              "full": {**entry, "method": "full", "sweep": [setting("lr", {0: (0.48, 40.0), 1: (0.48, 40.0)})]}}
    pretrained = {s: {"memory": {"known_f1": 0.9, "known_f1_memory_zeroed": 0.5, "heldout_nll": 2.0,
                                 "heldout_nll_memory_zeroed": 2.5, "facts_f1": 0.0}} for s in ("0", "1")}
    return sweeps, pretrained


LEVEL = "sparse within the forgetting budget learns at least half of the new facts"


def test_a_check_passing_on_the_mean_but_not_on_seed_1_is_a_fail_naming_seed_1(tmp_path):
    """Sparse `a` learns 0.52 over all four runs (PASS), 0.59 on seed 0 and 0.45 on seed 1: the
    level line of headline.md and report.md is FAIL and names seed 1, report.json keeps each seed's
    result. Seed 1 alone also chooses its own matched setting (`b`: `a` misses full's 0.48 there),
    so full's 40% is not 3x sparse's 30% on that seed either."""
    sweeps, pretrained = _two_seed_facts(seed1_level=0.45)
    report = {"config": {"pretrain_seeds": [0, 1], "fact_orders": 2, "pretrain": {"steps": 10},
                         "benchmark": {"n_known": 5, "n_new": 2, "paraphrases": 2}, "retrofit": {"enabled": False}},
              "pretrained": pretrained, "tasks": {"facts": {"steps": 2, "sweeps": sweeps}}, "times": {"total_s": 1.0}}
    write_report(tmp_path, report, reference_method="sparse", target_method="full")
    want = (f"- FAIL: {LEVEL}: learned F1 0.520 (needs >= 0.5) — fails on seed 1: seed 0 PASS (0.590), "
            f"seed 1 FAIL (0.450); the mean passes")
    forgets = ("- FAIL: full forgets at least 3x as much as sparse: 40.0% vs 4.0% — fails on seed 1: "
               "seed 0 PASS (40.0% vs 4.0%), seed 1 FAIL (40.0% vs 30.0%); the mean passes")
    for page in ("headline.md", "report.md"):
        lines = (tmp_path / page).read_text().splitlines()
        assert want in lines and forgets in lines, page
    saved = {c["claim"].split(":")[0]: c for c in json.loads((tmp_path / "report.json").read_text())["tasks"]["facts"]["checks"]}
    assert saved[LEVEL]["status"] == "FAIL" and saved[LEVEL]["mean_status"] == "PASS"
    assert saved[LEVEL]["per_seed"] == {"0": {"status": "PASS", "value": "0.590"}, "1": {"status": "FAIL", "value": "0.450"}}
    as_full = saved["sparse within the forgetting budget learns as well as full finetuning's best minus 0.05"]
    assert as_full["status"] == "PASS" and {r["status"] for r in as_full["per_seed"].values()} == {"PASS"}
    assert "per_seed" not in saved["sparse within the forgetting budget"]  # INFO: not a check


def test_a_check_passing_on_every_seed_says_so_and_one_seed_lines_are_unchanged():
    sweeps, pretrained = _two_seed_facts(seed1_level=0.51)
    got = {c["claim"].split(":")[0]: c for c in task_checks("facts", sweeps, pretrained, "sparse", "full")[1]}
    assert check_line(got[LEVEL]) == (f"- PASS: {LEVEL}: learned F1 0.550 (needs >= 0.5) — every seed: "
                                      f"seed 0 PASS (0.590), seed 1 PASS (0.510)")
    assert {c["status"] for c in got.values()} == {"PASS", "INFO"}
    # one pretraining seed: the checks on its runs, as the mean's lines always were
    one_seed = {name: {**e, "sweep": [{"setting": r["setting"], **aggregate_runs([o for o in r["runs"] if o["seed"] == 0])}
                                      for r in e["sweep"]]} for name, e in sweeps.items()}
    methods, lines = task_checks("facts", one_seed, {"0": pretrained["0"]}, "sparse", "full")
    assert lines == checks("facts", methods, one_seed, "sparse", {"memory": {**pretrained["0"]["memory"], "seeds": 1}})
    assert all(check_line(c) == f"- {c['status']}: {c['claim']}" for c in lines)

def test_config_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="command-line override.*bogus"):
        load_continual_config("configs/demo/smoke.yaml", ["bogus=1"])
    with pytest.raises(ConfigError, match="method 'full' setting.*optim.lrr"):
        load_continual_config("configs/demo/smoke.yaml", ["methods.1.sweep=[optim.lrr=1]"])
    with pytest.raises(ConfigError, match="fact_orders=0 must be >= 1"):
        load_continual_config("configs/demo/smoke.yaml", ["fact_orders=0"])
    with pytest.raises(ConfigError, match="target_method"):
        load_continual_config("configs/demo/smoke.yaml", ["target_method=nope"])
    with pytest.raises(ConfigError, match="n_docs=0 with 3 documents.methods"):
        load_continual_config("configs/demo/smoke.yaml", ["benchmark.n_docs=0"])
    with pytest.raises(ConfigError, match="pretrain_seeds"):
        load_continual_config("configs/demo/smoke.yaml", ["pretrain_seeds=[1,1]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark:\n  n_knwn: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*n_knwn"):
        load_continual_config(bad)


def test_dense_init_is_the_dense_twin_or_the_retrofit_start():
    from smft_dist.continual.benchmark import finetune_config

    for path in ("configs/demo/smoke.yaml", "configs/demo/retrofit_cpu.yaml", "configs/demo/retrofit_smoke.yaml"):
        c = load_continual_config(path)
        by_name = {m.name: m for m in c.methods}
        dense_name = "full" if c.retrofit.enabled else "full-dense"
        assert by_name[dense_name].init == "dense"
        dense = finetune_config(c, "facts", by_name[dense_name], by_name[dense_name].sweep[0], Path("/out/seed0"))
        memory = finetune_config(c, "facts", by_name["sparse"], by_name["sparse"].sweep[0], Path("/out/seed0"))
        assert dense.model.memory_layers == [] and dense.model.init_from == "/out/seed0/dense_pretrain/checkpoints"
        assert memory.model.memory_layers == c.run.model.memory_layers
        assert memory.model.init_from == "/out/seed0/background_index/checkpoints"
        assert memory.model.memory_mode == ("add" if c.retrofit.enabled else "replace")
    with pytest.raises(ConfigError, match="init='bogus'"):
        load_continual_config("configs/demo/smoke.yaml", ["methods.1.init=bogus"])


@pytest.mark.slow
def test_retrofit_smoke_starts_sparse_from_the_retrofit_and_full_from_the_dense_model(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from smft_dist.model import SmftForCausalLM

    out = tmp_path / "retrofit"
    run_cli([PY, "launchers/continual.py", "--config", "configs/demo/retrofit_smoke.yaml", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    pre, methods = report["pretrained"]["0"], report["tasks"]["facts"]["methods"]
    assert report["config"]["retrofit"]["mode"] == "add" and len(pre["memory"]["mean_abs_gate"]) == 1
    assert pre["memory"]["mean_abs_gate"][0] > 0  # continued pretraining opened the zero-init gate
    assert methods["full"]["heldout_nll_before"] == pre["dense"]["heldout_nll"]  # full FT: the dense model
    assert methods["sparse"]["heldout_nll_before"] == pre["memory"]["heldout_nll"]  # sparse: the retrofitted one
    assert "Retrofit path" in (out / "report.md").read_text()
    # the retrofit itself (before continued pretraining) computes exactly what the dense model does
    seed0 = out / "seed0"
    dense, smft = LlamaForCausalLM.from_pretrained(seed0 / "dense_hf"), SmftForCausalLM.from_pretrained(seed0 / "retrofit_model")
    ids = torch.arange(3, 35).view(2, 16)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, smft(ids).logits)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs" / "demo").glob("*.yaml")))
def test_every_shipped_demo_config_loads_and_validates(name):
    """Every run setting of every sweep is derived and validated at load (load_continual_config)."""
    c = load_continual_config(Path(__file__).parents[1] / "configs" / "demo" / name)
    assert c.methods and c.pretrain_seeds
