"""Knowledge patches at mp 2: a 2-rank sparse finetune's ledger (each rank its own rows) exports a
patch that reproduces the finetuned memory bitwise on a checkpoint and on a loaded, row-sharded
model patched in place by each rank (the serving API)."""
import shutil

import pytest
import torch

from smft_dist.distributed.spawn import run_ranks
from smft_dist.patch.apply import apply_patch, live_target, open_target, revert_steps
from smft_dist.patch.patch import export_patch
from tests.conftest import PY, checkpoint_tensors, latest_dir, run_cli
from tests.test_patch import PER_FACT, finetune_args, write_fact_batches

pytestmark = pytest.mark.slow


def _patch_live_sharded(rank, world, patch, base):
    """Load the base model, shard its memory over the 2 ranks, apply the patch on each rank's rows."""
    from smft_dist.config import DistConfig
    from smft_dist.distributed import init_distributed, shard_memory
    from smft_dist.distributed.sharding import gather_full_table
    from smft_dist.checkpoint.model import load_checkpoint_model

    ctx = init_distributed(DistConfig())
    model, _ = load_checkpoint_model(base)
    tables = shard_memory(model, ctx)
    report = apply_patch(patch, live_target(model))
    return {"rows": report.rows["layer2"], "bounds": (tables[0].row_start, tables[0].row_end),
            "full": gather_full_table(tables[0])}


def test_patch_of_a_two_rank_run_reproduces_its_memory(tiny_data, patch_base_model, tmp_path):
    write_fact_batches(tiny_data, tmp_path / "facts")
    # 2 ranks x PER_FACT / 2 samples: one fact per global step, as at mp 1
    run_cli([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launchers/train.py",
             *finetune_args(tiny_data, tmp_path / "facts", patch_base_model, tmp_path / "run", "steps=4",
                            f"data.batch_size={PER_FACT // 2}")])
    assert sorted(p.name for p in (tmp_path / "run" / "ledger").glob("*.index")) == ["rank0of2.index",
                                                                                       "rank1of2.index"]
    patch = export_patch(tmp_path / "run")
    assert [s.groups for s in patch.steps] == [[0], [1], [2], [3]] and all(len(s.batch_sha256) == 2 for s in patch.steps)
    want = checkpoint_tensors(latest_dir(tmp_path / "run" / "checkpoints"))["memory"]
    assert not torch.equal(want, checkpoint_tensors(latest_dir(patch_base_model))["memory"])

    shutil.copytree(patch_base_model, tmp_path / "base")
    apply_patch(patch, open_target(tmp_path / "base", writable=True))
    assert torch.equal(checkpoint_tensors(latest_dir(tmp_path / "base"))["memory"], want)

    # reverting every step of the 2-shard checkpoint (two row files) gives back the base bitwise
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "reverted")
    revert_steps(patch, open_target(tmp_path / "reverted", writable=True), [s.step for s in patch.steps])
    assert len(list((latest_dir(tmp_path / "reverted") / "memory").iterdir())) == 2
    assert torch.equal(checkpoint_tensors(latest_dir(tmp_path / "reverted"))["memory"],
                       checkpoint_tensors(latest_dir(patch_base_model))["memory"])

    ranks = run_ranks(_patch_live_sharded, 2, patch, str(patch_base_model))
    assert ranks[0]["bounds"][1] == ranks[1]["bounds"][0]  # each rank patched only its own rows
    assert sum(r["rows"] for r in ranks) == patch.touched("layer2").numel()
    for r in ranks:
        assert torch.equal(r["full"], want)
