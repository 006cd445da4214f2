"""smft-patch on a checkpoint leaves it resumable and true to its rows: apply then resume continues
at the same step from the patched values; revert on a bf16 table with momentum, then one more
update of a reverted row, does not bring the reverted update back."""
import shutil

import pytest
import torch

from smft_dist.patch.patch import export_patch
from tests.reliability.conftest import (PY, TRAIN, checkpoint_tensors, config_args, run_cli, single_process_env,
                                        small_config)


def _finetune_overrides(rel_data, good_run) -> list[str]:
    # bf16 values (fp32 master rows in the optimizer state) and momentum: the row state a patch must
    # not leave stale; a large lr so that one step moves bf16 rows (their ulp is ~2^-8 relative)
    return [f"model.init_from={good_run}/bg/checkpoints", f"data.train={rel_data}/new_facts",
            "model.memory_value_dtype=bfloat16", "optim.momentum=0.9", "optim.memory_lr=1000", "optim.memory_lr_scale=mean",
            "selection.top_t=16"]


@pytest.fixture(scope="module")
def finetuned(rel_data, good_run, tmp_path_factory):
    """A 4-step sparse finetune of good_run, checkpointed at steps 2 and 4, with its ledger."""
    out = tmp_path_factory.mktemp("patch_ckpt") / "run"
    run_cli([*TRAIN, *config_args("finetune_sparse", out, rel_data, *_finetune_overrides(rel_data, good_run),
                                  "steps=4", "checkpoint.every=2")])
    return out


def _patch_file(run, tmp_path, steps: str):
    path = tmp_path / "p.smftpatch"
    run_cli([PY, "-m", "smft_dist.patch.cli", "export", str(run), "--out", str(path), "--steps", steps])
    return path


def test_patch_applied_to_a_checkpoint_resumes_from_the_patched_rows_at_its_step(finetuned, rel_data, good_run,
                                                                                    tmp_path):
    """Steps 3-4 applied to the step-2 checkpoint, then resumed for one step: the run starts at step
    2 (not refused, not fallen back) and every patched row step 3 did not update holds its patched
    value, which is the finetune's step-4 value, bitwise."""
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(finetuned / "checkpoints" / "step_2", run / "checkpoints" / "step_2")
    (run / "checkpoints" / "latest").write_text("step_2")
    run_cli([PY, "-m", "smft_dist.patch.cli", "apply", str(_patch_file(finetuned, tmp_path, "3-4")),
             str(run / "checkpoints")])
    patched = checkpoint_tensors(run / "checkpoints" / "step_2")["memory"]
    assert torch.equal(patched, checkpoint_tensors(finetuned / "checkpoints" / "step_4")["memory"])

    r = run_cli([*TRAIN, *config_args("finetune_sparse", run, rel_data, *_finetune_overrides(rel_data, good_run),
                                      "steps=3", "checkpoint.fallback=true")])
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in r.stdout
    step3 = export_patch(run).steps
    assert [s.step for s in step3] == [3]
    patch_rows = export_patch(finetuned, steps=[3, 4])
    kept = ~torch.isin(patch_rows.touched("layer1"), step3[0].layers["layer1"].ids)
    rows = patch_rows.touched("layer1")[kept]
    assert rows.numel() > 0
    after = checkpoint_tensors(run / "checkpoints" / "step_3")["memory"]
    assert torch.equal(after[rows], patched[rows])


def test_reverted_row_is_not_brought_back_by_its_next_update(finetuned, rel_data, good_run, tmp_path, monkeypatch):
    """Step 4 reverted on the step-4 checkpoint (bf16 values, fp32 master rows, momentum 0.9), then
    resumed in-process and a row step 4 wrote updated with gradient g: it becomes exactly
    bf16(before + (-lr * g)), the update of a row the optimizer never saw. A master copy or
    momentum buffer kept from step 4 would add step 4's update back (the fp32 after value,
    0.9 x its buffer)."""
    from smft_dist.config import CheckpointConfig
    from smft_dist.distributed import init_distributed
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.trainer import build_run

    shutil.copytree(finetuned / "checkpoints", tmp_path / "ckpt")
    run_cli([PY, "-m", "smft_dist.patch.cli", "revert", str(_patch_file(finetuned, tmp_path, "4")),
             str(tmp_path / "ckpt"), "--steps", "4"])
    step4 = export_patch(finetuned, steps=[4]).steps[0].layers["layer1"]
    before_UD = step4.before  # bf16: step 4 is the last step, so its rows return exactly to these
    assert not torch.equal(before_UD, step4.after)  # step 4 moved them: there is an update to revert

    single_process_env(monkeypatch)
    cfg = small_config(*_finetune_overrides(rel_data, good_run), f"out_dir={tmp_path / 'run'}", "steps=5",
                       config="finetune_sparse")
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    checkpointer = Checkpointer(CheckpointConfig(resume=str(tmp_path / "ckpt")), tmp_path / "ckpt", ctx, cfg.model)
    assert checkpointer.load(trainer, None) == 4
    table = trainer.tables[0]
    assert torch.equal(table.weight[step4.ids], before_UD)
    grad_UD = torch.randn(step4.ids.numel(), table.dim, generator=torch.Generator().manual_seed(0)) * 1e-3
    table.zero_step()
    table.push_grad(step4.ids, grad_UD)
    trainer.memory_optimizer.step([step4.ids])
    # the optimizer's own fp32 arithmetic on a fresh row: buffer 0.9 x 0 + g = g, master = the stored row
    want_UD = (before_UD.float() - cfg.optim.memory_lr * grad_UD).to(torch.bfloat16)
    assert torch.equal(table.weight[step4.ids], want_UD)


def test_a_damaged_checkpoint_is_refused_before_anything_is_rehashed(finetuned, tmp_path):
    """Re-hashing a flipped byte into the manifest would make the damage pass as intact."""
    from smft_dist.patch.apply import open_target
    from smft_dist.checkpoint.layout import CheckpointError

    step_dir = tmp_path / "step_4"
    shutil.copytree(finetuned / "checkpoints" / "step_4", step_dir)
    shard = next((step_dir / "memory").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    manifest = (step_dir / "manifest.json").read_bytes()
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its checksum"):
        open_target(step_dir, writable=True)
    assert (step_dir / "manifest.json").read_bytes() == manifest
