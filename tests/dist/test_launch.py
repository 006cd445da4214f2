"""2-process runs of every mode and method through torchrun and the DeepSpeed launcher, and the
invariants of sparse memory finetuning under DeepSpeed, checked on the checkpoints it writes."""
import json

import pytest
import torch

from tests.conftest import PY, checkpoint_tensors, data_overrides, latest_dir, run_cli

pytestmark = pytest.mark.slow

LAUNCHERS = {
    "torchrun": [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launchers/train.py"],
    "deepspeed": [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731",
                  "launchers/train.py"],
}
ENGINE = {"torchrun": ["dist.engine=none"], "deepspeed": ["dist.engine=deepspeed", "dist.zero_stage=1"]}


def launch(launcher, config, out_dir, *overrides, data, init_from=None):
    args = [*LAUNCHERS[launcher], "--config", f"configs/tiny/{config}.yaml", f"out_dir={out_dir}",
            *data_overrides(data), *ENGINE[launcher], *overrides]
    if init_from is not None:
        args.append(f"model.init_from={init_from}")
    if config.startswith("finetune"):
        args.append(f"data.train={data}/new_facts")
    return run_cli(args)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("config", ["pretrain", "background_index", "finetune_full", "finetune_lora",
                                    "finetune_sparse"])
def test_every_mode_and_method_runs_on_two_ranks(launcher, config, tiny_data, tiny_pretrained, tmp_path):
    steps = ["steps=4", "checkpoint.every=2"] if config != "background_index" else ["selection.background_batches=4"]
    init = None if config == "pretrain" else tiny_pretrained
    r = launch(launcher, config, tmp_path, *steps, data=tiny_data, init_from=init)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "checkpoints" / latest / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["mp"] == 2
    assert len(list((tmp_path / "checkpoints" / latest / "memory").iterdir())) == 2  # one shard per rank
    if config == "background_index":
        assert (tmp_path / "checkpoints" / latest / "df" / "layer2.safetensors").is_file()
        return
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and all(l["loss"] == l["loss"] for l in lines)
    if config == "finetune_sparse":
        assert all(l["rows_updated"] <= 50 and l["rows_selected"] <= 50 for l in lines)


def test_sparse_finetune_under_deepspeed_changes_only_top_t_rows(tiny_data, tiny_pretrained, tmp_path):
    top_t = 20
    launch("deepspeed", "finetune_sparse", tmp_path, "steps=3", "checkpoint.every=1", "checkpoint.keep=10",
           f"selection.top_t={top_t}", data=tiny_data, init_from=tiny_pretrained)
    dense0 = checkpoint_tensors(latest_dir(tiny_pretrained))
    mem_prev = dense0.pop("memory")
    for step in (1, 2, 3):
        dense = checkpoint_tensors(tmp_path / "checkpoints" / f"step_{step}")
        mem = dense.pop("memory")
        for k in dense0:
            assert torch.equal(dense[k], dense0[k]), f"dense weight {k} changed at step {step}"
        changed = (mem != mem_prev).any(dim=1).sum().item()
        assert 0 < changed <= top_t, f"step {step}: {changed} rows changed"
        mem_prev = mem


def test_resume_at_another_world_size_continues_at_the_saved_step(tiny_data, tmp_path):
    common = ["--config", "configs/tiny/pretrain.yaml", f"out_dir={tmp_path}", *data_overrides(tiny_data)]
    run_cli([PY, "launchers/train.py", *common, "steps=3"])  # one process
    r = run_cli([*LAUNCHERS["torchrun"], *common, "steps=5"])  # resumed on 2 ranks
    assert "at step 3" in r.stdout and "resharded" in r.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    meta = json.loads((tmp_path / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["world_size"] == 2
