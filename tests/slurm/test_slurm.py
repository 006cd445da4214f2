"""slurm/*.sh on a real single-node cluster: 2 ranks on one CPU node, the tiny finetune config.

Each job runs `sbatch slurm/finetune.sh` as a user would, with the GPU header overridden for a
CPU node (--gpus-per-node=0) and GPUS_PER_NODE=2 ranks. The preemption test signals the running
job as Slurm does before a time limit, and checks that the requeued job resumes and ends with
the same weights, bit for bit, as an uninterrupted run.
"""
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.conftest import checkpoint_tensors, latest_dir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = "configs/tiny/finetune_sparse.yaml"


# What an in-process run leaves in os.environ (streaming reads its ranks from there), and sbatch
# exports to the job: the DeepSpeed launcher sets no LOCAL_WORLD_SIZE, so a stale 1 made every
# rank a streaming local leader (two leaders, one shared-memory name: "File exists").
STALE_RANK_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def submit(cluster, tmp: Path, overrides: list[str], script="slurm/finetune.sh", nodes=1, ranks_per_node=2,
           **env: str) -> int:
    """sbatch `script` from the repo root on a CPU cluster (`ranks_per_node` ranks on each of `nodes`
    nodes); log: tmp/<name>-<id>.out. Submitted from a shell that ran a single-process job before
    (STALE_RANK_ENV): slurm/_launch.sh must keep them from the ranks."""
    env = {"CONFIG": CONFIG, "GPUS_PER_NODE": str(ranks_per_node), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "OVERRIDES": " ".join(overrides), **STALE_RANK_ENV, **env}
    return cluster.sbatch(script, env, f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={ranks_per_node}",
                          f"--output={tmp}/%x-%j.out", cwd=ROOT)


def log_of(info: dict) -> str:
    return Path(info["StdOut"]).read_text()


def metric_steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_completed(info: dict) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {info['JobId']} ended {info['JobState']} ({info['ExitCode']}):\n{log_of(info)[-4000:]}")


@pytest.fixture
def finetune_overrides(tiny_data, tiny_pretrained):
    return [f"data.train={tiny_data}/new_facts", f"model.init_from={tiny_pretrained}",
            "logging.progress=false"]


def test_finetune_job_runs_two_ranks_then_resumes(slurm_cluster, finetune_overrides, tmp_path):
    out = tmp_path / "run"
    first = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [f"out_dir={out}", "steps=4", *finetune_overrides]))
    assert_completed(first)
    log = log_of(first)
    assert "ranks 0-1 of 2: " in log and "torch.distributed.run" in log
    step_dir = out / "checkpoints" / "step_4"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert json.loads((step_dir / "meta.json").read_text())["world_size"] == 2
    assert (step_dir / "data.json").is_file()  # the global data position (one file: streaming's state is global)
    assert len(list((step_dir / "memory").glob("*.safetensors"))) == 2  # one row shard per rank
    assert metric_steps(out) == [1, 2, 3, 4]

    second = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [f"out_dir={out}", "steps=7", *finetune_overrides]))
    assert_completed(second)
    assert f"resumed from {step_dir} at step 4" in log_of(second)
    assert metric_steps(out) == list(range(1, 8))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_7"


def test_pretrain_and_background_index_scripts(slurm_cluster, tiny_data, tmp_path):
    data = [f"data.train={tiny_data}/pretrain", f"data.background={tiny_data}/background",
            "logging.progress=false"]
    pre = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [f"out_dir={tmp_path}/pre", "steps=3", *data],
                                    script="slurm/pretrain.sh", CONFIG="configs/tiny/pretrain.yaml"))
    assert_completed(pre)
    assert metric_steps(tmp_path / "pre") == [1, 2, 3]
    bg = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [f"out_dir={tmp_path}/bg", *data,
                                                             f"model.init_from={tmp_path}/pre/checkpoints",
                                                             "selection.background_batches=4"],
                                   script="slurm/background_index.sh",
                                   CONFIG="configs/tiny/background_index.yaml"))
    assert_completed(bg)
    assert "background df index over 4 batches" in log_of(bg)
    assert list((tmp_path / "bg" / "checkpoints" / "step_0" / "df").glob("*.safetensors"))


def wait_for_steps(out_dir: Path, n: int, timeout: float = 120.0) -> None:
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{metrics} has fewer than {n} steps after {timeout}s")
        time.sleep(0.2)


# scancel --signal=USR1 reaches every process of the steps, as --signal=USR1@N does; with --batch
# only the batch shell gets it, as with --signal=B:USR1@N, and passes it on. `launcher_saw_75`:
# the launcher outlived its ranks (had it died of the signal, they would have been orphaned).
@pytest.mark.parametrize("launcher,scancel_args,launcher_saw_75", [
    ("torchrun", ["--signal=USR1"], "exitcode: 75"),
    ("deepspeed", ["--batch", "--signal=USR1"], "exits with return code = 75"),
], ids=["torchrun-steps-signalled", "deepspeed-batch-signalled"])
def test_preempted_job_requeues_and_ends_bitwise_equal(slurm_cluster, finetune_overrides, tmp_path,
                                                        launcher, scancel_args, launcher_saw_75):
    common = ["steps=20", "checkpoint.every=0", *finetune_overrides]
    ref = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [f"out_dir={tmp_path}/ref", *common],
                                    LAUNCHER=launcher))
    assert_completed(ref)

    out = tmp_path / "preempted"
    job = submit(slurm_cluster, tmp_path, [f"out_dir={out}", *common], LAUNCHER=launcher)
    wait_for_steps(out, 2)  # the ranks' signal handlers are installed before the first step
    slurm_cluster.run("scancel", *scancel_args, str(job))
    info = slurm_cluster.wait(job)
    assert_completed(info)
    log = log_of(info)
    assert info["Restarts"] == "1", log[-4000:]
    assert "preempted by signal 10" in log and "requeueing" in log and "(restart 1)" in log
    assert launcher_saw_75 in log
    saved = int(re.search(r"preempted by signal 10: saved \S+ at step (\d+)", log).group(1))
    assert 2 <= saved < 20 and f"at step {saved}" in log.split("(restart 1)")[1]
    assert metric_steps(out) == list(range(1, 21))  # every step exactly once

    step_dir = latest_dir(out / "checkpoints")
    want, got = checkpoint_tensors(latest_dir(tmp_path / "ref" / "checkpoints")), checkpoint_tensors(step_dir)
    assert step_dir.name == "step_20" and want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_bad_config_fails_the_job_with_a_clear_message(slurm_cluster, tmp_path):
    info = slurm_cluster.wait(submit(slurm_cluster, tmp_path, [], CONFIG="configs/tiny/nope.yaml"))
    assert info["JobState"] == "FAILED"
    assert "CONFIG=configs/tiny/nope.yaml does not exist" in log_of(info)


def test_cancelled_job_saves_and_stays_cancelled(slurm_cluster, finetune_overrides, tmp_path):
    """Plain scancel sends SIGTERM: the ranks save (the contract), but the job is not requeued."""
    out = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, [f"out_dir={out}", "steps=200", "checkpoint.every=0", *finetune_overrides])
    wait_for_steps(out, 2)
    slurm_cluster.run("scancel", str(job))
    slurm_cluster.wait(job)
    time.sleep(8)  # longer than a requeue's hold (cred_expire + 1 s): a requeue would show by now
    info = slurm_cluster.job(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log_of(info)[-4000:]
    assert "preempted by signal 15" in log_of(info)
    saved = (out / "checkpoints" / "latest").read_text().strip()
    assert saved.startswith("step_") and saved != "step_200"
