import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import `tests.dist.helpers`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core machines run 2 ranks

import subprocess

import pytest

PY = sys.executable


def skip_unless_ci(reason: str) -> None:
    """Skip where an optional part is missing; on CI (CI=true), where .ci/run installs everything, a
    missing part is a failure, so a broken install step cannot pass as a skip."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


LAUNCHER_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                           "MASTER_ADDR", "MASTER_PORT")


def run_cli(args, timeout=600, env=None, check=True):
    """Run a command from the repo root; on failure show the tail of its output. The rank variables
    that in-process runs leave in this process's environment are not passed on: a launcher sets its own."""
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_RANK_VARIABLES}
    full_env = {**inherited, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def ledger_killed_at(step: int, record_delay_s: float = 0.0) -> str:
    """`python -c` source of the training launcher whose ledger writer, `record_delay_s` late on
    every record (a slow disk), writes half of step `step`'s record and is then SIGKILLed."""
    return f"""
import os, signal, sys, time
from safetensors.torch import save
from smft_dist.patch.ledger import Ledger
append = Ledger.append
def dying_append(self, step, tensors, metadata):
    time.sleep({record_delay_s})
    if step == {step}:
        blob = save(tensors, metadata=metadata)
        self._records.write(blob[:len(blob) // 2])
        self._records.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, step, tensors, metadata)
Ledger.append = dying_append
from smft_dist.train.loop import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic benchmark (MDS shards + tokenizer), made once per test session."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    run_cli([PY, "-m", "smft_dist.data.cli", "synthetic", "--out", str(out), "--seed", "0", "--n-known", "30",
             "--n-new", "8", "--seq-len", "32", "--pretrain-docs", "3000", "--background-docs", "600",
             "--heldout-docs", "100"])
    return out


def latest_dir(root) -> Path:
    """The step folder named by a checkpoint root's `latest` file."""
    root = Path(root)
    return root / (root / "latest").read_text().strip()


def checkpoint_tensors(step_dir) -> dict:
    """Dense weights and the memory rows (shards concatenated in row order) of a checkpoint."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(Path(step_dir) / "dense.safetensors"))
    shards = sorted((Path(step_dir) / "memory").glob("*.safetensors"),
                    key=lambda f: int(f.name.split("rows_")[1].split("_")[0]))
    tensors["memory"] = torch.cat([load_file(str(f))["rows"] for f in shards])
    return tensors


def data_overrides(data) -> list[str]:
    return [f"data.train={data}/pretrain", f"data.background={data}/background", "logging.progress=false"]


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory):
    """Pretrain 20 steps, then build the df index: -> the background_index run's checkpoints dir."""
    root = tmp_path_factory.mktemp("pretrained")
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={root}/pretrain",
             "steps=20", *data_overrides(tiny_data)])
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/background_index.yaml", f"out_dir={root}/bg",
             f"model.init_from={root}/pretrain/checkpoints", "selection.background_batches=10",
             *data_overrides(tiny_data)])
    return root / "bg" / "checkpoints"


@pytest.fixture(scope="session")
def patch_base_model(tiny_data, tiny_pretrained, tmp_path_factory):
    """tiny_pretrained trained 40 steps more, with its df index: after 20 steps the memory keys
    route every fact to nearly the same rows, after 60 each fact has rows of its own."""
    root = tmp_path_factory.mktemp("patch_base")
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"out_dir={root}/pretrain",
             f"model.init_from={tiny_pretrained}", "steps=40", "checkpoint.every=0", *data_overrides(tiny_data)])
    run_cli([PY, "launchers/train.py", "--config", "configs/tiny/background_index.yaml", f"out_dir={root}/bg",
             f"model.init_from={root}/pretrain/checkpoints", "selection.background_batches=10",
             *data_overrides(tiny_data)])
    return root / "bg" / "checkpoints"
