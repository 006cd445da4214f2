"""The ledger's background writer (smft_dist.patch.ledger, docs/patches.md): it writes the
records the synchronous writer did; a run SIGKILLed mid-run keeps, in each `ledger.fsync` mode,
every step up to its last checkpoint and only complete steps after it; `ledger.fsync` decides when
the files are fsynced; a failure of the writer is raised on the training thread."""
import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from smft_dist.config import ConfigError, validate
from smft_dist.memory.values import ValueTable
from smft_dist.patch.ledger import Ledger, LedgerError, complete_steps, read_meta, read_step
from tests.conftest import ledger_killed_at
from tests.reliability.conftest import (PY, TRAIN, checkpoint_tensors, config_args, latest_dir, run_cli,
                                        small_config)

ENTRY = struct.Struct("<qQQI")  # an index entry: step, offset, length, crc32


def _tables(rank: int, world: int, dtype) -> list[ValueTable]:
    """Two memory layers of 16 rows x 4, rank `rank`'s share of them, seeded."""
    tables = []
    for seed in (0, 1):
        t = ValueTable(16, 4, rank * 16 // world, (rank + 1) * 16 // world, dtype=dtype)
        t.reset_parameters(torch.Generator().manual_seed(seed))
        tables.append(t)
    return tables


def _update(tables, selected, step: int) -> None:
    """The optimizer step stand-in: an in-place change of each selected row this rank holds."""
    for t, ids in zip(tables, selected):
        own = ids[(ids >= t.row_start) & (ids < t.row_end)]
        t.weight.data[own - t.row_start] += step


def _synchronous_record(tables, selected, names, writes_rows: bool, body) -> dict:
    """The tensors the synchronous writer (before the background one) saved for one step: this
    rank's selected ids and their rows gathered before and after the body."""
    own = [ids[(ids >= t.row_start) & (ids < t.row_end)] if writes_rows else ids[:0]
           for t, ids in zip(tables, selected)]
    before = [t.weight.detach()[ids - t.row_start].cpu() for t, ids in zip(tables, own)]
    body()
    out = {}
    for name, t, ids, b in zip(names, tables, own, before):
        out[f"{name}.ids"], out[f"{name}.before"] = ids.cpu(), b
        out[f"{name}.after"] = t.weight.detach()[ids - t.row_start].cpu()
    return out


def _header_and_payload(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors blob as (its JSON header, the tensor bytes after it). The header is compared
    parsed: safetensors writes the metadata keys in hash-map order, which differs from call to
    call (two saves of the same dict by the synchronous writer differ there too)."""
    n = struct.unpack_from("<Q", blob)[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_background_records_equal_the_synchronous_writers(dtype, tmp_path):
    """Two ranks' shards and a data-parallel replica (writes_rows=False), 6 steps whose selections
    straddle the shard bound or miss a rank entirely: every record in the files equals the
    safetensors blob the synchronous writer built for that step: the tensor bytes byte for byte,
    the header (names, dtypes, shapes, offsets, metadata) as parsed JSON."""
    names, world = ["layers.1", "layers.3"], 2
    writers = [(0, True), (1, True), (1, False)]  # (rank, writes_rows); the replica writes its own folder
    g = torch.Generator().manual_seed(7)
    for rank, writes_rows in writers:
        root = tmp_path / f"r{rank}{writes_rows}"
        tables, replay = _tables(rank, world, dtype), _tables(rank, world, dtype)
        ledger = Ledger.open(root, rank=rank, world_size=world, names=names, meta={}, writes_rows=writes_rows)
        expected = []
        for step in range(1, 7):
            selected = [torch.randperm(16, generator=g)[:5].sort().values for _ in names]
            if step == 3:
                selected[0] = torch.tensor([0, 1, 2], dtype=torch.int64)  # rank 1 holds none of them
            batch = {"input_ids": torch.full((2, 3), step), "group": torch.tensor([step, 40 + step])}
            ledger.begin_step(batch)
            with ledger.recording(tables, selected):
                _update(tables, selected, step)
            tensors = _synchronous_record(replay, selected, names, writes_rows, lambda: _update(replay, selected, step))
            meta = {"step": str(step), "groups": json.dumps([step, 40 + step]),
                    "batch_sha256": ledger._identity[1]}
            expected.append(st_save(tensors, metadata=meta))
        ledger.close()
        index = (root / f"rank{rank}of{world}.index").read_bytes()
        data = (root / f"rank{rank}of{world}.records").read_bytes()
        assert len(index) == len(expected) * ENTRY.size
        for i, blob in enumerate(expected):
            step, offset, length, _ = ENTRY.unpack_from(index, i * ENTRY.size)
            assert step == i + 1 and _header_and_payload(data[offset:offset + length]) == _header_and_payload(blob)


def _fsyncs(monkeypatch) -> list[int]:
    """The fds os.fsync is called on, in order (the syscall still runs)."""
    calls, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


@pytest.mark.parametrize("mode", ["checkpoint", "step"])
def test_ledger_fsync_decides_when_records_are_fsynced(mode, tmp_path, monkeypatch):
    """fsync="checkpoint": no fsync while recording, both files at sync(); "step": the record then
    its index entry for every step, as the writer appends them."""
    calls = _fsyncs(monkeypatch)
    tables = _tables(0, 1, torch.float32)
    ledger = Ledger.open(tmp_path, rank=0, world_size=1, names=["m", "n"], meta={}, fsync=mode)
    records, index = ledger._records.fileno(), ledger._index.fileno()
    for step in range(1, 4):
        ledger.begin_step({"input_ids": torch.ones(1, 2, dtype=torch.int64)})
        with ledger.recording(tables, [torch.tensor([step]), torch.tensor([step + 1])]):
            pass
    ledger.wait()
    assert calls == ([] if mode == "checkpoint" else [records, index] * 3)
    ledger.sync()
    assert calls[-2:] == [records, index]
    ledger.close()


def test_a_writer_error_is_raised_on_the_training_thread(tmp_path):
    """The records file on a full disk (/dev/full: every write fails with ENOSPC): the writer's
    OSError comes back as a LedgerError naming it, at sync() and at every later record and close."""
    (tmp_path / "rank0of1.records").symlink_to("/dev/full")
    tables = _tables(0, 1, torch.float32)
    ledger = Ledger.open(tmp_path, rank=0, world_size=1, names=["m", "n"], meta={})
    ledger.begin_step({"input_ids": torch.ones(1, 2, dtype=torch.int64)})
    with ledger.recording(tables, [torch.tensor([1]), torch.tensor([2])]):
        pass
    with pytest.raises(LedgerError, match="rank 0 failed at step 1.*No space left") as raised:
        ledger.sync()
    assert raised.value.__cause__.errno == errno.ENOSPC
    with pytest.raises(LedgerError, match="failed at step 1"):
        with ledger.recording(tables, [torch.tensor([1]), torch.tensor([2])]):
            pass
    with pytest.raises(LedgerError, match="failed at step 1"):
        ledger.close()


def test_a_full_ledger_disk_stops_the_run_with_one_error_line(rel_data, good_run, tmp_path):
    """The launcher with its ledger's records file on /dev/full: the writer's ENOSPC stops the run
    (exit 2, one `error:` line naming the step and the cause) instead of finishing without a ledger."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (ledger / "rank0of1.records").symlink_to("/dev/full")
    args = config_args("finetune_sparse", tmp_path / "run", rel_data, f"model.init_from={good_run}/bg/checkpoints",
                       f"data.train={rel_data}/new_facts", "steps=4", "checkpoint.every=0", f"ledger.dir={ledger}")
    r = run_cli([*TRAIN, *args], check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    assert "failed at step 1" in errors[0] and "No space left on device" in errors[0], errors


# The launcher with a slow ledger disk (each record 0.2 s late: the writer falls QUEUE_STEPS behind
# the 10-50 ms steps) whose writer is SIGKILLed halfway through the record of step KILL_STEP.
KILL_STEP = 8


@pytest.mark.parametrize("mode", ["checkpoint", "step"])
def test_a_killed_run_keeps_every_step_up_to_its_last_checkpoint_and_only_complete_steps(
        mode, rel_data, good_run, tmp_path):
    """docs/patches.md, "what a killed run keeps": checkpoints every 3 steps, the writer killed in
    step 8's record. In each mode the ledger holds exactly steps 1-7 (step 8's half record is not
    a step); the latest checkpoint is step 6 (the step-9 checkpoint waits for the ledger, which
    never gets there; without that wait the training thread, up to QUEUE_STEPS + 1 steps ahead of
    the writer, saves step 9 while the writer is still on step 7); each step's `before` rows are
    the rows as the previous steps left them, and applying steps 1-6 to the initial rows gives the
    step-6 checkpoint's rows bitwise."""
    out = tmp_path / "run"
    args = config_args("finetune_sparse", out, rel_data, f"model.init_from={good_run}/bg/checkpoints",
                       f"data.train={rel_data}/new_facts", "selection.top_t=16", "optim.memory_lr=100",
                       "optim.memory_lr_scale=mean", "steps=30", "checkpoint.every=3", f"ledger.fsync={mode}")
    r = run_cli([PY, "-c", ledger_killed_at(KILL_STEP, record_delay_s=0.2), *args], check=False)
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL
    found = complete_steps(out / "ledger")
    assert list(found) == list(range(1, KILL_STEP)), list(found)
    assert latest_dir(out / "checkpoints").name == "step_6"
    (name,) = read_meta(out / "ledger")["layers"]
    rows = checkpoint_tensors(latest_dir(good_run / "bg" / "checkpoints"))["memory"].clone()
    for step in found:
        rec = read_step(step, found[step], [name]).layers[name]
        assert len(rec.ids) and torch.equal(rows[rec.ids], rec.before), step
        rows[rec.ids] = rec.after
        if step == 6:
            assert torch.equal(rows, checkpoint_tensors(latest_dir(out / "checkpoints"))["memory"])


@pytest.mark.parametrize("value", ["true", "sometimes"])
def test_ledger_fsync_takes_checkpoint_or_step(value):
    """The key's old boolean form, or a typo, stops the run naming the key and its choices."""
    with pytest.raises(ConfigError, match=r"ledger.fsync=.* is not one of \['checkpoint', 'step'\]"):
        validate(small_config(f"ledger.fsync={value}", config="finetune_sparse"))
