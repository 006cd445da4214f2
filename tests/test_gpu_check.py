"""The GPU check (smft_dist.bench.gpu_check): on CPU it skips with its reason; with --allow-cpu and
the tiny model it runs every phase through the real trainer, importing neither omegaconf nor
DeepSpeed nor mosaicml-streaming (the GPU machines have none of them)."""
import json

import pytest
import torch

from tests.conftest import PY, run_cli

NO_EXTRAS = "import sys; [sys.modules.__setitem__(m, None) for m in ('omegaconf', 'deepspeed', 'streaming')]; "


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run, not skip")
def test_skips_with_its_reason_without_a_gpu(tmp_path, capsys):
    from smft_dist.bench.gpu_check import main

    out = main(["--json", str(tmp_path / "gpu.json")])
    assert out == json.loads((tmp_path / "gpu.json").read_text()) and "no CUDA device" in out["skipped"]


def test_runs_every_phase_on_cpu_without_omegaconf_deepspeed_or_streaming(tmp_path):
    args = ["--allow-cpu", "--model", "configs/model/tiny.yaml", "--seq-len", "16", "--batch", "2", "--steps", "1",
            "--warmup", "1", "--df-batches", "2", "--top-t", "20", "--json", str(tmp_path / "gpu.json")]
    run_cli([PY, "-c", NO_EXTRAS + f"from smft_dist.bench.gpu_check import main; main({args!r})"])
    out = json.loads((tmp_path / "gpu.json").read_text())
    phases = out["phases"]
    assert set(phases) == {"pretrain", "full_finetune", "sparse_finetune"} and out["precision"] == "bf16"
    for p in phases.values():
        assert p["step_s"] > 0 and p["tokens_per_step"] == 32 and p["tokens_per_s"] > 0 and p["peak_memory_mb"] > 0
    assert 0 < phases["sparse_finetune"]["rows_updated_last"] <= 20  # the TF-IDF top-t, not every touched row
    assert phases["pretrain"]["rows_updated_last"] > 20
    lookup = out["lookup"]
    assert lookup["tokens"] == 32 and lookup["ids_per_token"] == 4 * 16 and lookup["fraction_of_copy_bandwidth"] > 0
    assert out["sparse_over_full_step_time"] == phases["sparse_finetune"]["step_s"] / phases["full_finetune"]["step_s"]
