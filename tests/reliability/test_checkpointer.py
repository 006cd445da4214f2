"""The checkpointer at scale: integrity checks with the previous complete step named, fallback,
re-saves killed midway, pruning that spares `latest`, and a resume across world sizes 2 -> 1 -> 2
that reads every sample exactly once and continues the LR schedule."""
import json
import os

import pytest
import torch

from smft_dist.config import CheckpointConfig
from tests.dist.helpers import run_ranks
from tests.reliability.conftest import (TRAIN, config_args, random_batch, run_cli, single_process_env,
                                        small_config, tree_digest)


def _trainer_and_checkpointer(tmp_path, ckpt_cfg: CheckpointConfig, *overrides):
    from smft_dist.distributed import init_distributed
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.trainer import build_run

    cfg = small_config(f"out_dir={tmp_path}", *overrides)
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    checkpointer = Checkpointer(ckpt_cfg, tmp_path / "checkpoints", ctx, cfg.model)
    return cfg, trainer, checkpointer, checkpointer.load(trainer, None)


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_resave_of_latest_step_killed_midway_leaves_a_loadable_latest(crash_at, tmp_path, monkeypatch):
    """Re-saving step 2 (a preemption right after a periodic save in another process, or a rerun)
    dies at the 1st, 2nd or 3rd rename (old folder aside, new folder in, `latest` replaced): `latest`
    still resolves to a complete step 2, whose weights load, old or new."""
    from smft_dist.checkpoint import layout as ckpt

    single_process_env(monkeypatch)
    cfg, trainer, checkpointer, _ = _trainer_and_checkpointer(tmp_path, CheckpointConfig(resume="none", keep=1))
    trainer.train_step(random_batch(cfg, seed=1))
    checkpointer.save(2, force=True)
    first = _weights(trainer)
    trainer.train_step(random_batch(cfg, seed=2))
    second = _weights(trainer)
    checkpointer._saved_step = None  # as a new process would: step 2 exists on disk only

    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2, force=True)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)

    step_dir = ckpt.resolve_checkpoint(tmp_path / "checkpoints")
    assert ckpt.verify_checkpoint(step_dir) == [] and ckpt.read_meta(step_dir)["step"] == 2
    _, fresh, _, step = _trainer_and_checkpointer(tmp_path, CheckpointConfig(resume="auto"))
    assert step == 2
    loaded = _weights(fresh)
    expect = first if crash_at <= 2 else second  # the new folder is complete once renamed into place
    for k in expect:
        assert torch.equal(loaded[k], expect[k]), k
    trainer.train_step(random_batch(cfg, seed=3))
    checkpointer.save(3, force=True)  # the next save leaves no leftovers and spares nothing stale
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_3"], names


def test_pruning_never_deletes_the_step_latest_names(tmp_path, monkeypatch):
    """A rerun from scratch (resume=none, keep=1) into a folder holding a later step of an old run:
    its own step is what `latest` names, and pruning must keep it."""
    from smft_dist.checkpoint import layout as ckpt

    single_process_env(monkeypatch)
    _, _, old, _ = _trainer_and_checkpointer(tmp_path, CheckpointConfig(resume="none", keep=1))
    old.save(10, force=True)
    _, _, rerun, _ = _trainer_and_checkpointer(tmp_path, CheckpointConfig(resume="none", keep=1))
    rerun.save(1, force=True)
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints").name == "step_1"
    assert (tmp_path / "checkpoints" / "step_1" / "meta.json").is_file()


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip one byte in the middle: same size, wrong checksum
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_step_run(rel_data, tmp_path_factory):
    """A finished 2-step run saved at steps 1 and 2."""
    out = tmp_path_factory.mktemp("two_step")
    run_cli([*TRAIN, *config_args("pretrain", out, rel_data, "steps=2", "checkpoint.every=1")])
    return out


@pytest.mark.parametrize("target,how", [("memory/layer1.rows_0_256.safetensors", "truncate"),
                                        ("memory_optim/rows_0_256.safetensors", "flip"), ("data.json", "flip")])
def test_damaged_file_is_named_with_the_previous_step_then_fallback_resumes(target, how, two_step_run, rel_data,
                                                                            tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_step_run, run)
    _damage(run / "checkpoints" / "step_2" / target, how)
    before = tree_digest(run / "checkpoints")
    args = [*TRAIN, *config_args("pretrain", run, rel_data, "steps=3")]
    r = run_cli(args, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert target in errors[0] and "damaged" in errors[0] and "step_1" in errors[0], errors[0]
    assert tree_digest(run / "checkpoints") == before  # nothing written or deleted
    r = run_cli([*args, "checkpoint.fallback=true"])
    assert "at step 1" in r.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [2, 3]


# ----- resume across world sizes -----
def _numbered_run_config(data, out):
    from smft_dist.config import load_config
    from tests.reliability.conftest import ROOT, SMALL

    return load_config(ROOT / "configs/tiny/pretrain.yaml",
                       [*SMALL, f"data.train={data}", "data.batch_size=3", "data.shuffle=false", "data.seq_len=8", f"out_dir={out}",
                        "steps=6", "optim.schedule=cosine", "optim.warmup_steps=2", "model.vocab_size=64"])


def _train_and_record(rank, world_size, data, out, stop):
    """Resume (resume=auto) at this world size, train until step `stop`, save; -> (groups read, lrs)."""
    from smft_dist.distributed import init_distributed
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.loop import build_loader
    from smft_dist.train.trainer import build_run

    cfg = _numbered_run_config(data, out)
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    loader = build_loader(cfg, ctx, data)
    checkpointer = Checkpointer(cfg.checkpoint, out / "checkpoints", ctx, cfg.model)
    step = checkpointer.load(trainer, loader)
    groups, lrs = [], [trainer.engine.scheduler.get_last_lr()[0]]
    batches = iter(loader)
    while step < stop:  # no batch beyond `stop` is fetched: the saved position counts what was read
        batch = next(batches)
        groups += batch["group"].tolist()
        trainer.train_step(batch)
        step += 1
        lrs.append(trainer.engine.scheduler.get_last_lr()[0])
    checkpointer.save(step, force=True)
    return groups, lrs


def test_resume_world_2_to_1_to_2_reads_every_sample_once_and_continues_the_schedule(tmp_path):
    """30 numbered samples, unshuffled: 2 steps at world 2 (12 samples), 2 at world 1 (6), 2 at
    world 2 (12) read each sample exactly once, and the LR at every step is the uninterrupted
    schedule's."""
    from smft_dist.train.trainer import lr_lambda
    from tests.reliability.test_faults import _write_numbered

    _write_numbered(tmp_path / "mds", 30)
    data, out = tmp_path / "mds", tmp_path / "run"
    seen, lrs = [], []
    for world, stop in ((2, 2), (1, 4), (2, 6)):
        results = run_ranks(_train_and_record, world, data, out, stop)
        seen += [g for groups, _ in results for g in groups]
        lrs.append(results[0][1])
    assert sorted(seen) == list(range(30)), sorted(seen)
    cfg = _numbered_run_config(data, out)
    schedule = lr_lambda(cfg)
    for phase, (first_step, got) in enumerate(zip((0, 2, 4), lrs)):
        want = [cfg.optim.lr * schedule(s) for s in range(first_step, first_step + len(got))]
        assert got == pytest.approx(want, rel=1e-12), f"phase {phase}"
