"""Shared pieces of the reliability tests: a small dataset, a small model, an in-process run.

The model here is smaller than configs/model/tiny.yaml (256 slots, d 64, 2 layers) so a CLI run
is dominated by start-up; every run uses fixed seeds, fp32 and the CPU, so repeated runs are
bitwise equal.
"""
import hashlib
from pathlib import Path

import pytest
import torch

from tests.conftest import LAUNCHER_RANK_VARIABLES, PY, ROOT, checkpoint_tensors, latest_dir, run_cli  # noqa: F401 (re-exported)

SMALL = ["model.hidden_size=64", "model.intermediate_size=32", "model.num_hidden_layers=2", "model.memory_layers=[1]",
         "model.memory_n_keys=16", "model.memory_knn=4", "model.memory_k_dim=16", "model.memory_value_dim=32",
         "data.batch_size=4", "logging.progress=false"]
TRAIN = [PY, "launchers/train.py"]
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "launchers/train.py"]


def config_args(config: str, out_dir, data, *overrides) -> list[str]:
    """--config and overrides of a small run on `data` (the fixture's dataset folder)."""
    return ["--config", f"configs/tiny/{config}.yaml", f"out_dir={out_dir}", f"data.train={data}/pretrain",
            f"data.background={data}/background", *SMALL, *overrides]


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`: 'nothing written was lost or changed'."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def rel_data(tmp_path_factory) -> Path:
    """A small synthetic benchmark (seconds to write)."""
    out = tmp_path_factory.mktemp("rel_data") / "syn"
    run_cli([PY, "-m", "smft_dist.data.cli", "synthetic", "--out", str(out), "--n-known", "30", "--n-new", "10",
             "--seq-len", "32", "--pretrain-docs", "600", "--background-docs", "200", "--heldout-docs", "50"])
    return out


@pytest.fixture(scope="session")
def good_run(rel_data, tmp_path_factory) -> Path:
    """out_dir of a finished 2-step single-process pretraining run with a background df index:
    what a bad run must leave untouched."""
    out = tmp_path_factory.mktemp("good_run")
    run_cli([*TRAIN, *config_args("pretrain", out, rel_data, "steps=2")])
    run_cli([*TRAIN, *config_args("background_index", out / "bg", rel_data, f"model.init_from={out}/checkpoints",
                                  "selection.background_batches=2")])
    return out


def single_process_env(monkeypatch) -> None:
    """In-process runs: no launcher variables, so `init_distributed` gives world 1."""
    for k in LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(k, raising=False)


def small_config(*overrides, config: str = "pretrain"):
    from smft_dist.config import load_config

    return load_config(ROOT / f"configs/tiny/{config}.yaml", [*SMALL, "data.train=unused", *overrides])


def random_batch(cfg, batch: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.model.vocab_size, (batch, cfg.data.seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

