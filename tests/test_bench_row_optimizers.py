"""`python -m smft_dist.bench.row_optimizers`: each row-wise optimizer's run judged against AdamW's
run of the same pretraining seed (docs/design.md §1.3), on report.json files of the shape
`launchers/continual.py` writes."""
import json
import re

import pytest

from smft_dist.bench.row_optimizers import compare, main, markdown
from smft_dist.errors import UserError


def _report(folder, seed: int, known: float, zeroed: float, checks: dict) -> None:
    folder.mkdir()
    tasks = {}
    for key, status in checks.items():
        task, name = key.split("/")
        tasks.setdefault(task, {"checks": [{"claim": "an INFO line has no key", "status": "INFO"}]})
        tasks[task]["checks"].append({"key": name, "status": status, "value": f"value of {name}"})
    memory = {"known_f1": known, "known_f1_memory_zeroed": zeroed, "heldout_nll": 1.5}
    (folder / "report.json").write_text(json.dumps({"pretrained": {str(seed): {"memory": memory}}, "tasks": tasks}))


def test_each_run_is_judged_against_adamw_of_its_seed(tmp_path):
    _report(tmp_path / "a0", 0, 0.94, 0.62, {"facts/as_full": "FAIL", "facts/forgets:full": "PASS"})
    _report(tmp_path / "a1", 1, 0.99, 0.62, {"facts/as_full": "PASS", "facts/forgets:full": "PASS"})
    # seed 1: 0.95 is 0.04 under AdamW's 0.99, zeroing costs 0.25, and it loses as_full
    _report(tmp_path / "r1", 1, 0.95, 0.70, {"facts/as_full": "FAIL", "facts/forgets:full": "PASS"})
    # seed 0: within 0.03 (0.92 against 0.94), zeroing 0.32, and it gains as_full
    _report(tmp_path / "r0", 0, 0.92, 0.60, {"facts/as_full": "PASS", "facts/forgets:full": "PASS"})
    records = compare({"adamw": [tmp_path / "a1", tmp_path / "a0"], "rowwise": [tmp_path / "r1", tmp_path / "r0"]})
    assert [(r["optimizer"], r["seed"]) for r in records] == [("adamw", 0), ("adamw", 1), ("rowwise", 0), ("rowwise", 1)]
    r0, r1 = records[2], records[3]
    assert (r0["known_f1_ok"], r0["zeroing_ok"], r0["lost"], r0["gained"]) == (True, True, [], ["facts/as_full"])
    assert (r1["known_f1_ok"], r1["zeroing_ok"], r1["lost"], r1["gained"]) == (False, False, ["facts/as_full"], [])
    assert r1["known_f1_vs_adamw"] == -0.04
    table = markdown(records)
    assert "| rowwise | 1 | 0.950 | 0.250 | 1.500 | - | value of forgets:full | facts/as_full | none |" in table


def test_a_seed_adamw_lacks_and_a_missing_run_are_one_error_line(tmp_path, capsys):
    _report(tmp_path / "a0", 0, 0.94, 0.62, {})
    _report(tmp_path / "r5", 5, 0.94, 0.62, {})
    with pytest.raises(UserError, match="^rowwise has seed 5, which adamw has not"):
        compare({"adamw": [tmp_path / "a0"], "rowwise": [tmp_path / "r5"]})
    for argv, says in (([f"adamw={tmp_path / 'a0'}", f"rowwise={tmp_path / 'nope'}"], "'rowwise=.*nope' must be name=folder"),
                       ([f"rowwise={tmp_path / 'r5'}"], "no adamw=... group"),
                       ([f"adamw={tmp_path / 'a0'}", f"rowwise={tmp_path / 'r5'}"], "rowwise has seed 5")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(f"error: {says}.*\n", err), err
