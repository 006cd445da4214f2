"""Rerunning a run in its out_dir: a finished run is left as it is; a changed training key is refused
(its weights were trained under the old value) unless checkpoint.allow_config_change opts in;
a raised `steps` continues the run."""
import shutil

import pytest
import yaml

from tests.reliability.conftest import TRAIN, config_args, run_cli, tree_digest

BASE = ["steps=2", "optim.memory_lr=0.03"]


@pytest.fixture(scope="module")
def finished(rel_data, tmp_path_factory):
    """A 2-step pretrain run, run to its end."""
    out = tmp_path_factory.mktemp("rerun") / "run"
    run_cli([*TRAIN, *config_args("pretrain", out, rel_data, *BASE)])
    return out


def _files_as_written(root) -> dict:
    """relative path -> (sha256, mtime_ns): 'nothing was rewritten', even with the same bytes."""
    return {name: (digest, (root / name).stat().st_mtime_ns) for name, digest in tree_digest(root).items()}


def test_rerun_of_a_finished_run_says_it_is_complete_and_rewrites_nothing(finished, rel_data):
    before = _files_as_written(finished)
    r = run_cli([*TRAIN, *config_args("pretrain", finished, rel_data, *BASE)])
    assert "run complete at step 2" in r.stdout
    assert _files_as_written(finished) == before  # config.yaml, checkpoint, metrics, ledger


def test_rerun_with_a_changed_training_key_is_refused_before_anything_is_written(finished, rel_data):
    before = _files_as_written(finished)
    r = run_cli([*TRAIN, *config_args("pretrain", finished, rel_data, *BASE, "optim.memory_lr=0.3")], check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "optim.memory_lr: 0.03 -> 0.3" in errors[0]
    assert "out_dir" in errors[0] and "checkpoint.allow_config_change=true" in errors[0]
    assert _files_as_written(finished) == before
    assert yaml.safe_load((finished / "config.yaml").read_text())["optim"]["memory_lr"] == 0.03


@pytest.mark.parametrize("opt_in", [False, True], ids=["more_steps", "changed_key_opted_in"])
def test_rerun_with_more_steps_continues_the_run(finished, rel_data, tmp_path, opt_in):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    changed = ["optim.memory_lr=0.3", "checkpoint.allow_config_change=true"] if opt_in else []
    r = run_cli([*TRAIN, *config_args("pretrain", run, rel_data, *BASE, "steps=3", *changed)])
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in r.stdout and "done: 3 steps" in r.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["steps"], saved["optim"]["memory_lr"]) == (3, 0.3 if opt_in else 0.03)
