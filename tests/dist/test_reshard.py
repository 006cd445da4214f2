"""Checkpoints reshard: written at mp=1 and loaded at mp=2, written at mp=2 and loaded at mp=1,
the logits are identical."""
import pytest
import torch

from smft_dist.config import CheckpointConfig, load_config
from smft_dist.distributed import context_from_group
from smft_dist.checkpoint.model import load_checkpoint_model
from smft_dist.train.checkpoint import Checkpointer
from smft_dist.train.trainer import build_run
from tests.dist.helpers import run_ranks

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def batch():
    return torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(1))


def _at_mp2(rank, world, init_from, save_root):
    # Bitwise logits prove every row landed in place. The unique-row exchange sums each token's bag
    # in one process's order, so it gives them; the pooled one adds per-owner partials, equal only
    # within fp32 summation noise (tests/dist/test_pooled_exchange.py).
    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml", [f"model.init_from={init_from}", "logging.progress=false",
                                                           "dist.memory_exchange=rows"])
    ctx = context_from_group(cfg.dist)
    tr = build_run(cfg, ctx)
    assert ctx.mp_size == 2 and tr.tables[0].row_end - tr.tables[0].row_start == 16384 // 2
    with torch.no_grad():
        logits = tr.model(batch()).logits  # every rank runs the same batch through its shard
    checkpointer = Checkpointer(CheckpointConfig(resume="none"), save_root, ctx)
    checkpointer.load(tr, None)
    checkpointer.save(7, force=True)
    return logits


def test_mp1_to_mp2_and_back_gives_identical_logits(tiny_pretrained, tmp_path):
    model1, _ = load_checkpoint_model(tiny_pretrained)  # written by a 1-process run
    with torch.no_grad():
        ref = model1(batch()).logits
    logits = run_ranks(_at_mp2, 2, str(tiny_pretrained), str(tmp_path))
    for rank_logits in logits:
        assert torch.equal(rank_logits, ref)
    assert len(list((tmp_path / "step_7" / "memory").iterdir())) == 2
    back, _ = load_checkpoint_model(tmp_path)  # written at mp=2, loaded at mp=1
    with torch.no_grad():
        assert torch.equal(back(batch()).logits, ref)
