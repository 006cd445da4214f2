"""The GPU check (smft_dist.bench.gpu_check): without CUDA it skips with its reason; with
--allow-cpu it launches itself under torchrun (2 gloo ranks here: the sharded exchange) and runs
every phase of the paper's setup through the real trainer: DeepSpeed ZeRO-1 bf16 pretraining and
full finetuning, the sparse finetune on padded fact batches with the ledger on, the stage labels
from the profiler, and the plan beside each phase. Neither omegaconf nor mosaicml-streaming nor
peft is imported by any rank (the GPU machines are offline: only the wheels its docstring lists)."""
import json

import pytest
import torch

from tests.conftest import PY, run_cli

# Every process the check starts (the launcher, torchrun, both ranks) imports this first.
BLOCK_EXTRAS = "import sys\nfor m in ('omegaconf', 'streaming', 'peft'):\n    sys.modules[m] = None\n"
STEPS = {"--warmup": 1, "--steps": 1, "--profile-steps": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run, not skip")
def test_skips_with_its_reason_without_a_gpu(tmp_path):
    from smft_dist.bench.gpu_check import main

    out = main(["--json", str(tmp_path / "gpu.json")])
    assert out == json.loads((tmp_path / "gpu.json").read_text()) and "no CUDA device" in out["skipped"]


def test_runs_the_papers_setup_on_two_cpu_ranks(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_EXTRAS)
    args = ["--allow-cpu", "--cpu-ranks", "2", "--model", "configs/model/tiny.yaml", "--seq-len", "32", "--batch", "2",
            "--df-batches", "2", "--top-t", "20", "--json", str(tmp_path / "gpu.json"),
            *(x for k, v in STEPS.items() for x in (k, str(v)))]
    run_cli([PY, "-m", "smft_dist.bench.gpu_check", *args], env={"PYTHONPATH": str(tmp_path / "site")})
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert out["world"] == out["mp"] == 2 and out["backend"] == "gloo" and out["precision"] == "bf16"
    # 2 ranks: the exchange ran; no CUDA: no device time, no pinned copy
    assert len(out["not_measured"]) == 2 and "device time" in out["not_measured"][0]
    assert "pinned" in out["not_measured"][1]
    phases = out["phases"]
    assert list(phases) == ["pretrain", "full_finetune", "sparse_finetune", "pretrain_offload"]
    offload = phases["pretrain_offload"]["offload"]
    assert offload["h2d_bytes_per_step"] > 0 and offload["host_rows_moved_last"] > 0
    assert offload["pinned_copy_bytes_per_s"] is None and offload["fraction_of_pinned_copy"] is None
    for name in ("pretrain", "full_finetune", "pretrain_offload"):
        assert phases[name]["engine"] == "DeepSpeedEngine" and phases[name]["zero_stage"] == 1
        assert phases[name]["tokens_per_step"] == 2 * 2 * 32  # both ranks' rows
    sparse = phases["sparse_finetune"]
    # 8 paraphrases of one fact per rank, 16..48 real tokens of 64
    assert sparse["engine"] == "PlainEngine" and sparse["micro_batch"] == 8 and sparse["seq_len"] == 64
    assert 2 * 8 * 16 <= sparse["tokens_per_step"] <= 2 * 8 * 48
    assert 0 < sparse["rows_updated_last"] <= 20  # the TF-IDF top-t
    assert sparse["ledger_steps_complete"] == sum(STEPS.values())  # every step on both ranks' files
    for name, phase in phases.items():
        stages = phase["stages"]
        assert phase["exchanges"], name  # the sharded lookup ran
        for label in ("smft/exchange_fwd", "smft/exchange_bwd"):
            assert stages[label]["bytes_sent_per_step"] > 0, (name, label)
        assert stages["smft/scoring"]["cpu_ms_per_step"] > 0 and stages["smft/scoring"]["device_ms_per_step"] is None
        # labels of stages a phase does not run are reported missing, not as zero time
        dense = name != "sparse_finetune"
        assert (stages["smft/selection"] == "missing") == dense and (stages["smft/ledger"] == "missing") == dense
        memory = phase["memory"]
        assert memory["plan_total_bytes"] == sum(memory["plan_parts"].values()) and "peak_allocated_bytes" not in memory
    assert phases["pretrain"]["memory"]["plan_parts"]["deepspeed_buffers"] > 0
    assert out["sparse_over_full_step_time"] == sparse["step_s"] / phases["full_finetune"]["step_s"]
