"""Faults on real multi-process runs (CPU, gloo): a rank that dies or hangs stops the others in
bounded time; a restart from the last checkpoint ends bitwise where an uninterrupted run ends; a
save that fails midway leaves the previous checkpoint loadable and named by `latest`; the data
stream resumes with no sample lost or repeated."""
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT
from tests.dist.helpers import free_port, run_ranks
from tests.reliability.conftest import (TORCHRUN, TRAIN, checkpoint_tensors, config_args, latest_dir,
                                        random_batch, single_process_env, small_config, tree_digest)

TIMEOUT_S = 10  # dist.timeout_s of the fault runs
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _wait_for(path, procs, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"no {what} (exit codes {dead})"
        time.sleep(0.05)


def _exit_code(proc, limit_s: float, log) -> int:
    """The process's exit code; fails the test (and kills it) if it is still running after limit_s."""
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {limit_s}s after its peer failed (hang):\n{log.read_text()[-2000:]}")


@pytest.mark.parametrize("sig,cause", [(signal.SIGKILL, "Connection (closed|reset) by peer"), (signal.SIGSTOP, "Timed out")],
                         ids=["killed", "hung"])
def test_dead_or_hung_rank_stops_the_survivor(sig, cause, rel_data, tmp_path):
    """Two ranks started as independent processes (as `srun` does: no agent watches them). Rank 1
    is killed (its sockets close) or stopped (a hang: only the collective timeout can tell); rank 0
    must fail non-zero within dist.timeout_s plus slack, naming the cause."""
    port = free_port()
    procs, logs = [], []
    for r in range(2):
        env = {**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(tmp_path / f"rank{r}.log")
        procs.append(subprocess.Popen(
            [*TRAIN, *config_args("pretrain", tmp_path / "run", rel_data, "steps=100000", "checkpoint.every=2",
                                  f"dist.timeout_s={TIMEOUT_S}")],
            cwd=ROOT, env=env, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    try:
        _wait_for(tmp_path / "run/checkpoints/latest", procs, "first checkpoint")
        procs[1].send_signal(sig)
        rc = _exit_code(procs[0], TIMEOUT_S + 60, logs[0])
        assert rc != 0
        assert re.search(cause, logs[0].read_text())
    finally:
        procs[1].kill()
        procs[1].wait()
    # the last complete checkpoint is intact and loadable
    assert (latest_dir(tmp_path / "run/checkpoints") / "meta.json").is_file()


def test_torchrun_kill_then_restart_equals_uninterrupted(rel_data, tmp_path):
    """SIGKILL of one rank under torchrun: the run exits non-zero (its agent tears the other rank
    down). Restarting the same command resumes from the last checkpoint (weights, optimizer
    states, data position, RNG) and ends with weights and memory rows bitwise equal to a run
    that was never interrupted."""
    steps = 40
    common = ["optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.every=3", f"steps={steps}",
              f"dist.timeout_s={TIMEOUT_S}"]
    whole = subprocess.run([*TORCHRUN, *config_args("pretrain", tmp_path / "whole", rel_data, *common)], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    cmd = [*TORCHRUN, *config_args("pretrain", tmp_path / "split", rel_data, *common)]
    log = tmp_path / "split.log"
    run = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    _wait_for(tmp_path / "split/checkpoints/latest", [run], "first checkpoint")
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    assert _exit_code(run, TIMEOUT_S + 60, log) != 0
    killed_at = int(latest_dir(tmp_path / "split/checkpoints").name.split("_")[1])
    assert killed_at < steps, "the run finished before the kill: nothing was tested"

    resumed = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout
    a = checkpoint_tensors(latest_dir(tmp_path / "whole/checkpoints"))
    b = checkpoint_tensors(latest_dir(tmp_path / "split/checkpoints"))
    assert latest_dir(tmp_path / "split/checkpoints").name == f"step_{steps}" and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failed_save_keeps_previous_checkpoint_latest_and_loadable(tmp_path, monkeypatch):
    """A save that dies midway (here: the engine's optimizer-state write raises after the weights
    and memory shards of the new step were written) leaves `latest` on the previous step, that
    step byte-for-byte intact and loadable, and no half-written step that looks complete. The
    next successful save clears the leftovers."""
    from smft_dist.distributed import init_distributed
    from smft_dist.checkpoint import layout as ckpt
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.trainer import build_run

    from smft_dist.config import CheckpointConfig

    single_process_env(monkeypatch)
    cfg = small_config(f"out_dir={tmp_path}")
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    root = tmp_path / "checkpoints"
    checkpointer = Checkpointer(CheckpointConfig(every=1, keep=5, resume="none"), root, ctx)
    checkpointer.load(trainer, None)
    save = checkpointer.save

    trainer.train_step(random_batch(cfg, seed=1))
    save(1)
    saved = tree_digest(root / "step_1")
    weights_1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(random_batch(cfg, seed=2))

    def crash(path):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(trainer.engine, "save", crash)
    with pytest.raises(OSError, match="injected"):
        save(2)
    assert (root / "latest").read_text() == "step_1"
    assert not (root / "step_2").exists() and (root / "step_2.tmp" / "dense.safetensors").exists()
    assert ckpt.resolve_checkpoint(root) == root / "step_1" and tree_digest(root / "step_1") == saved

    fresh = build_run(small_config(f"out_dir={tmp_path}"), ctx)
    assert Checkpointer(CheckpointConfig(resume="auto"), root, ctx).load(fresh, None) == 1
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, weights_1[k]), k

    monkeypatch.undo()
    single_process_env(monkeypatch)
    save(3)
    assert (root / "latest").read_text() == "step_3" and not list(root.glob("*.tmp"))


# ----- data position -----
def _write_numbered(out, n: int, seq_len: int = 8) -> None:
    """n samples whose `group` column is the sample's number."""
    from smft_dist.data.mds import _sample, write_mds

    write_mds(out, (_sample([5 + i % 7] * 4, [1] * 4, seq_len, 0, i) for i in range(n)), grouped=True)


def _read_ids(rank, world_size, path, n_batches, state):
    """-> (sample numbers of this rank's next n_batches batches, loader state after them)."""
    from smft_dist.data.loader import build_dataloader, forever

    loader = build_dataloader(str(path), 3, shuffle=True, seed=7, rank=rank, world_size=world_size)
    if state is not None:
        loader.load_state_dict(state[rank])
    batches = forever(loader)
    ids = [next(batches)["group"].tolist() for _ in range(n_batches)]
    return [i for b in ids for i in b], loader.state_dict()


def test_data_position_resumes_without_loss_or_repeat(tmp_path):
    """2 ranks, shuffled, 30 samples = 5 global batches of 2 x 3 per epoch. Read 7 batches, save the
    loader state, resume in new processes and read 5 more (across the epoch boundary): the
    sequence equals an uninterrupted read of 12 batches, and each epoch covers every sample once."""
    _write_numbered(tmp_path / "mds", 30)
    whole = run_ranks(_read_ids, 2, tmp_path / "mds", 12, None)
    first = run_ranks(_read_ids, 2, tmp_path / "mds", 7, None)
    second = run_ranks(_read_ids, 2, tmp_path / "mds", 5, [s for _, s in first])
    for r in range(2):
        assert first[r][0] + second[r][0] == whole[r][0], f"rank {r}"
    for epoch in range(2):
        seen = sorted(i for r in range(2) for i in whole[r][0][epoch * 15:(epoch + 1) * 15])
        assert seen == list(range(30)), f"epoch {epoch}"


# ----- collective timeouts reach subgroups -----
def _hang_in_subgroup(rank, world_size):
    """World 4 = dp_replicate 2 x mp 2 with dist.timeout_s=3 on a world group of 120 s: rank 1 never
    joins its mp group's all_reduce, so rank 0 must time out after ~3 s, not the backend's 30 min."""
    from smft_dist.config import DistConfig
    from smft_dist.distributed.context import context_from_group

    ctx = context_from_group(DistConfig(dp_replicate=2, timeout_s=3))
    error = None
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1), group=ctx.mp_group)
        except RuntimeError as e:
            error = str(e)
    return error


def test_subgroup_collectives_time_out_after_dist_timeout():
    errors = run_ranks(_hang_in_subgroup, 4, timeout=120)
    assert "Timed out" in errors[0] and "3000ms" in errors[0], errors[0]
