"""Runs that read or rewrite a checkpoint do what they say: a background_index rerun into the same
out_dir rebuilds from its new input; model.init_from and smft-export refuse a damaged checkpoint
naming the file; a reshard reads only the optimizer rows a rank owns."""
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.config import CheckpointConfig
from tests.conftest import data_overrides
from tests.dist.helpers import run_ranks
from tests.reliability.conftest import (PY, TRAIN, checkpoint_tensors, config_args, latest_dir, random_batch, run_cli,
                                        single_process_env, small_config)


def _df(out_dir) -> dict:
    return load_file(str(latest_dir(out_dir / "checkpoints") / "df" / "layer1.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_background_index_rerun_into_its_out_dir_rebuilds_from_the_new_init_from(rel_data, good_run, tmp_path):
    """An index built from good_run over 1 batch, then rebuilt into the same out_dir from another
    pretraining over 2 batches: the saved df is a fresh build's, the weights the new init_from's."""
    repretrained = tmp_path / "repretrained"
    run_cli([*TRAIN, *config_args("pretrain", repretrained, rel_data, "steps=1", "seed=1")])

    def build_index(out_dir, init_from, batches):
        run_cli([*TRAIN, *config_args("background_index", out_dir, rel_data, f"model.init_from={init_from}",
                                      f"selection.background_batches={batches}")])

    build_index(tmp_path / "bg", good_run / "checkpoints", 1)
    first = _df(tmp_path / "bg")
    build_index(tmp_path / "bg", repretrained / "checkpoints", 2)  # the rerun
    build_index(tmp_path / "fresh", repretrained / "checkpoints", 2)
    rebuilt = _df(tmp_path / "bg")
    assert _equal(rebuilt, _df(tmp_path / "fresh")) and not _equal(rebuilt, first)
    weights, new_init = (checkpoint_tensors(latest_dir(p / "checkpoints")) for p in (tmp_path / "bg", repretrained))
    assert _equal(weights, new_init)
    assert not _equal(new_init, checkpoint_tensors(latest_dir(good_run / "checkpoints")))  # the rerun shows something


@pytest.fixture
def damaged_pretrained(tiny_pretrained, tmp_path):
    """A copy of tiny_pretrained with one byte of its memory shard's values flipped -> (root, shard)."""
    root = tmp_path / "damaged"
    shutil.copytree(tiny_pretrained, root)
    shard = next((latest_dir(root) / "memory").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # inside the row data (the header is at the start): still a well-formed file
    shard.write_bytes(bytes(data))
    return root, shard


def _one_error_naming(r, name: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert name in errors[0] and "damaged" in errors[0], errors[0]
    return errors[0]


def test_damaged_init_from_checkpoint_stops_the_finetune_naming_the_file(damaged_pretrained, tiny_data, tmp_path):
    root, shard = damaged_pretrained
    r = run_cli([PY, "launchers/train.py", "--config", "configs/tiny/finetune_sparse.yaml", *data_overrides(tiny_data),
                 f"data.train={tiny_data}/new_facts", f"model.init_from={root}", f"out_dir={tmp_path / 'ft'}",
                 "steps=1"], check=False)
    _one_error_naming(r, shard.name)
    assert not (tmp_path / "ft").exists()


def test_damaged_checkpoint_is_not_exported(damaged_pretrained, tmp_path):
    root, shard = damaged_pretrained
    r = run_cli([PY, "-m", "smft_dist.train.export", str(root), "--out", str(tmp_path / "hf")], check=False)
    _one_error_naming(r, shard.name)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


# ----- resharding the memory optimizer state -----
class _CountingSafeOpen:
    """safe_open that adds up the bytes of every tensor slice it hands out, per (file, tensor)."""

    def __init__(self, real, read: dict):
        self.real, self.read = real, read

    def __call__(self, path, *args, **kwargs):
        counter = self

        class Handle:
            def __init__(self):
                self.fh = counter.real(path, *args, **kwargs)

            def __enter__(self):
                self.fh.__enter__()
                return self

            def __exit__(self, *exc):
                return self.fh.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def get_slice(self, name):
                real_slice = self.fh.get_slice(name)

                class Slice:
                    def __getattr__(self, name):  # get_shape, get_dtype: the real slice's
                        return getattr(real_slice, name)

                    def __getitem__(self, index):
                        t = real_slice[index]
                        key = (str(path), name)
                        counter.read[key] = counter.read.get(key, 0) + t.numel() * t.element_size()
                        return t

                return Slice()

        return Handle()


def _train_and_save(out):
    """One process: 3 pretraining steps (lazy AdamW state on the rows touched), saved at step 3."""
    from smft_dist.distributed import init_distributed
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.trainer import build_run

    cfg = small_config(f"out_dir={out}")
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    checkpointer = Checkpointer(CheckpointConfig(resume="none"), out / "checkpoints", ctx, cfg.model)
    checkpointer.load(trainer, None)
    for seed in range(3):
        trainer.train_step(random_batch(cfg, seed=seed))
    checkpointer.save(3, force=True)


def _resume_counting_reads(rank, world, out):
    from smft_dist.distributed import init_distributed
    from smft_dist.checkpoint import layout as ckpt
    from smft_dist.train.checkpoint import Checkpointer
    from smft_dist.train.trainer import build_run

    read = {}
    ckpt.safe_open = _CountingSafeOpen(ckpt.safe_open, read)  # this rank's process only
    cfg = small_config(f"out_dir={out}")
    ctx = init_distributed(cfg.dist)
    trainer = build_run(cfg, ctx)
    step = Checkpointer(CheckpointConfig(resume="auto"), out / "checkpoints", ctx, cfg.model).load(trainer, None)
    table = trainer.tables[0]
    return {"step": step, "rows": (table.row_start, table.row_end), "read": read,
            "state": trainer.memory_optimizer.state_dict()["tables"][0]}


def test_reshard_mp1_to_mp2_reads_only_each_ranks_optimizer_rows(tmp_path, monkeypatch):
    single_process_env(monkeypatch)
    _train_and_save(tmp_path)
    (saved,) = (tmp_path / "checkpoints" / "step_3" / "memory_optim").iterdir()
    assert saved.name == "rows_0_256.safetensors"
    whole = load_file(str(saved))
    ids_S = whole["0.ids"]
    names = [k.split(".", 1)[1] for k in whole if k != "0.ids"]
    assert sorted(names) == ["exp_avg", "exp_avg_sq", "step"] and ids_S.numel() > 100  # most of the 256 rows

    ranks = run_ranks(_resume_counting_reads, 2, tmp_path)
    assert [r["rows"] for r in ranks] == [(0, 128), (128, 256)] and all(r["step"] == 3 for r in ranks)
    for r in ranks:
        lo, hi = r["rows"]
        mine = (ids_S >= lo) & (ids_S < hi)
        assert 0 < int(mine.sum()) < ids_S.numel()
        read = {name: n for (path, name), n in r["read"].items() if path == str(saved)}
        for name in names:  # each state tensor: exactly this rank's rows, not one byte more
            assert read[f"0.{name}"] == whole[f"0.{name}"][mine].numel() * whole[f"0.{name}"].element_size(), name
        # the ids: this rank's, plus a binary search for each end of the range (one 8-byte id per probe)
        probes = 2 * (math.ceil(math.log2(ids_S.numel())) + 1)
        assert int(mine.sum()) * 8 <= read["0.ids"] <= (int(mine.sum()) + probes) * 8
        state = r["state"]
        order = torch.argsort(state["ids"])
        assert torch.equal(state["ids"][order], ids_S[mine])  # the original rows' state, bitwise
        for name in names:
            assert torch.equal(state[name][order], whole[f"0.{name}"][mine]), name


def test_optimizer_state_of_an_older_format_is_refused_naming_the_file(tmp_path):
    """The pickled `rows_<a>_<b>.pt` of an older smft_dist: an error naming it, never a resume
    that silently drops the optimizer state (it matches no `*.safetensors` file)."""
    from smft_dist.memory.values import LocalValueTable
    from smft_dist.optim import MaskedSGD
    from smft_dist.checkpoint import layout as ckpt

    table = LocalValueTable(4, 2)
    optimizer = MaskedSGD([table], lr=1.0, momentum=0.5)
    (tmp_path / "memory_optim").mkdir()
    torch.save(optimizer.state_dict(), tmp_path / "memory_optim" / "rows_0_4.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rows_0_4\.pt: the memory optimizer state is in the pickle"):
        ckpt.load_memory_optimizer(optimizer, [table], tmp_path)
