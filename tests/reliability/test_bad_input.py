"""Bad input: each gives a clear error that names the problem and the fix, and nothing already
written (checkpoints, the run's config) is lost or changed; bad steps are skipped, not applied."""
import logging

import pytest
import torch

from smft_dist.config import ConfigError, load_config
from tests.conftest import ROOT, run_cli
from tests.dist.helpers import run_ranks
from tests.reliability.conftest import (TRAIN, config_args, random_batch, single_process_env, small_config,
                                        tree_digest)


# ----- command line: exit 2 with one line `error: ...`, the existing run untouched -----
def _empty_mds(tmp_path):
    """A folder with an MDS index.json but no samples."""
    from smft_dist.data.mds import COLUMNS
    from smft_dist.data.streaming_compat import import_streaming

    with import_streaming().MDSWriter(out=str(tmp_path / "empty"), columns=COLUMNS):
        pass
    return tmp_path / "empty"


def _df_for_other_slots(tmp_path):
    """A df index of layer1 built for 64 slots (the small model has 256)."""
    from smft_dist.memory.values import LocalValueTable
    from smft_dist.selection.background import BackgroundIndex

    BackgroundIndex.empty(LocalValueTable(64, 8)).save(tmp_path / "df" / "layer1.safetensors")
    return tmp_path / "df"


CLI_CASES = {  # id -> (overrides given the good run's folder and tmp_path, words the error must contain)
    "unknown_key": (lambda run, tmp: ["optim.lrr=2"], ["optim.lrr"]),
    "wrong_type": (lambda run, tmp: ["steps=ten"], ["steps", "ten"]),
    "missing_data": (lambda run, tmp: [f"data.train={tmp}/nowhere"], ["data.train", "does not exist"]),
    "data_without_index": (lambda run, tmp: [f"data.train={tmp}"], ["data.train", "index.json"]),
    "empty_data": (lambda run, tmp: [f"data.train={_empty_mds(tmp)}"], ["data.train", "holds no samples"]),
    "missing_init_from": (lambda run, tmp: [f"model.init_from={tmp}/nowhere"], ["model.init_from", "does not exist"]),
    "resume_other_hidden_size": (lambda run, tmp: ["model.hidden_size=32"], ["model.hidden_size=32", "hidden_size=64"]),
    "init_from_other_n_keys": (lambda run, tmp: ["checkpoint.resume=none", f"model.init_from={run}/checkpoints",
                                                 "model.memory_n_keys=8"], ["model.memory_n_keys=8"]),
    "not_a_checkpoint": (lambda run, tmp: [f"checkpoint.resume={tmp}"], ["not a checkpoint"]),
    "df_other_slot_count": (lambda run, tmp: ["mode=finetune", "method=sparse_memory", "checkpoint.resume=none",
                                              f"model.init_from={run}/checkpoints",
                                              f"selection.df_path={_df_for_other_slots(tmp)}"],
                            ["built for 64 slots", "model has 256", "background_index"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_line_and_keeps_the_run(case, good_run, rel_data, tmp_path):
    """Each bad run targets the out_dir of a finished run (resume=auto would pick its checkpoint)."""
    overrides, words = CLI_CASES[case]
    before = tree_digest(good_run)
    r = run_cli([*TRAIN, *config_args("pretrain", good_run, rel_data, "steps=4", *overrides(good_run, tmp_path))],
                check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    assert tree_digest(good_run) == before


# ----- the value table -----
def test_out_of_range_slot_ids_local_table():
    from smft_dist.memory.values import LocalValueTable

    t = LocalValueTable(16, 4)
    t.reset_parameters()
    w = t.weight.clone()
    for bad in (16, -1):
        with pytest.raises(IndexError, match=r"outside \[0, 16\).*memory_n_keys\^2"):
            t.embedding_bag(torch.tensor([[0, bad]]), torch.ones(1, 2))
    assert torch.equal(t.weight, w)


def _sharded_out_of_range(rank, world_size):
    from smft_dist.distributed.context import context_from_group
    from smft_dist.memory.sharded import ShardedValueTable

    table = ShardedValueTable.from_context(16, 4, context_from_group())
    try:
        table.embedding_bag(torch.tensor([[rank, 16 + rank]]), torch.ones(1, 2))
    except IndexError as e:
        return str(e)
    return None


def test_out_of_range_slot_ids_sharded_table():
    """Every rank refuses before any exchange, so no rank is left waiting in the all-to-all."""
    errors = run_ranks(_sharded_out_of_range, 2)
    for rank, e in enumerate(errors):
        assert e is not None and f"[{16 + rank}]" in e and "outside [0, 16)" in e


# ----- steps that must not update anything -----
def _trainer(monkeypatch, tmp_path, *overrides):
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_run

    single_process_env(monkeypatch)
    cfg = small_config(f"out_dir={tmp_path}", *overrides)
    return cfg, build_run(cfg, init_distributed(cfg.dist))


def _snapshot(trainer) -> dict:
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"table{i}": t.weight.detach().clone() for i, t in enumerate(trainer.tables)})
    return state


def _assert_unchanged(trainer, before: dict) -> None:
    after = _snapshot(trainer)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


METHODS = {"pretrain": [], "sparse_finetune": ["mode=finetune", "method=sparse_memory", "selection.mode=tf"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_and_all_padding_batches_select_and_update_nothing(method, monkeypatch, tmp_path, caplog):
    cfg, trainer = _trainer(monkeypatch, tmp_path, *METHODS[method])
    trainer.train_step(random_batch(cfg, seed=1))  # optimizer states exist: a skipped step must not move them
    before = _snapshot(trainer)
    padded = random_batch(cfg, seed=2)
    padded["attention_mask"].zero_()
    padded["labels"].fill_(-100)
    empty = {k: v[:0] for k, v in random_batch(cfg, seed=3).items()}
    for batch in (padded, empty):
        with caplog.at_level(logging.WARNING, logger="smft_dist"):
            metrics = trainer.train_step(batch)
        assert metrics == {"skipped": 1, "rows_selected": 0}
        assert "no label tokens" in caplog.text
        _assert_unchanged(trainer, before)


def _nan_logits(module, args, output):
    output.logits = output.logits * float("nan")
    return output


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_nonfinite_loss_skips_the_step_then_stops_after_k_in_a_row(poison, monkeypatch, tmp_path, caplog):
    from smft_dist.train.trainer import NonFiniteLossError

    cfg, trainer = _trainer(monkeypatch, tmp_path, "optim.max_nonfinite_steps=3")
    trainer.train_step(random_batch(cfg, seed=1))
    before = _snapshot(trainer)
    value = float(poison)
    handle = trainer.model.register_forward_hook(
        lambda m, a, out: setattr(out, "loss", out.loss * 0 + value) or out)
    for i in range(2):
        with caplog.at_level(logging.WARNING, logger="smft_dist"):
            assert trainer.train_step(random_batch(cfg, seed=2 + i))["skipped"] == 1
        assert f"non-finite loss ({poison}) on some rank: step skipped ({i + 1} in a row)" in caplog.text
    _assert_unchanged(trainer, before)
    handle.remove()  # a finite step resets the count
    assert "loss" in trainer.train_step(random_batch(cfg, seed=5))
    handle = trainer.model.register_forward_hook(
        lambda m, a, out: setattr(out, "loss", out.loss * 0 + value) or out)
    for _ in range(2):
        trainer.train_step(random_batch(cfg, seed=6))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row: lower the learning rate"):
        trainer.train_step(random_batch(cfg, seed=7))
    handle.remove()


def _one_rank_nan(rank, world_size):
    """Only rank 1 sees a NaN loss: both ranks must skip the step (no rank steps alone)."""
    from smft_dist.distributed.context import context_from_group
    from smft_dist.train.trainer import build_run

    cfg = small_config()
    trainer = build_run(cfg, context_from_group(cfg.dist))
    before = _snapshot(trainer)
    if rank == 1:
        trainer.model.register_forward_hook(lambda m, a, out: setattr(out, "loss", out.loss * float("nan")) or out)
    metrics = trainer.train_step(random_batch(cfg, seed=rank))
    _assert_unchanged(trainer, before)
    return metrics


def test_nan_on_one_rank_skips_the_step_on_every_rank():
    assert run_ranks(_one_rank_nan, 2) == [{"skipped": 1, "rows_selected": 0}] * 2


def test_yaml_with_unknown_key_or_wrong_type_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [" + str(ROOT / "configs/model/tiny.yaml") + "]\noptim:\n  lrr: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim\.lrr"):
        load_config(bad)
    bad.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data\.batch_size"):
        load_config(bad)
