"""`smft-data` (MDS writing) and the resumable, rank-partitioned loader."""
import json

import numpy as np
import pytest
import torch

from smft_dist.data.cli import main
from smft_dist.data.loader import DataError, build_dataloader, forever
from smft_dist.data.mds import write_mds
from smft_dist.data.tokenizer import load_tokenizer
from smft_dist.eval.qa import load_qa_jsonl
from smft_dist.io import atomic_dir
from tests.conftest import LAUNCHER_RANK_VARIABLES
from tests.dist.helpers import run_ranks

SEQ = 32


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "bench"
    rc = main(["synthetic", "--out", str(out), "--seed", "0", "--n-known", "30", "--n-new", "3",
               "--pretrain-docs", "400", "--background-docs", "60", "--heldout-docs", "40", "--seq-len", str(SEQ)])
    assert rc == 0
    return out


def _numbered(folder, n, offset=0):
    """n samples whose identity is their `group` (and input_ids[1] - offset)."""
    samples = ({"input_ids": np.array([1, i + offset, 2] + [0] * (SEQ - 3), np.int32),
                "attention_mask": np.array([1] * 3 + [0] * (SEQ - 3), np.uint8),
                "loss_mask": np.array([0, 1, 1] + [0] * (SEQ - 3), np.uint8), "group": i} for i in range(n))
    with atomic_dir(folder) as tmp:
        write_mds(tmp, samples, grouped=True)
    return str(folder)


def test_synthetic_cli_layout_and_schema(syn):
    meta = json.loads((syn / "meta.json").read_text())
    assert meta["new_facts"] == {"samples": 3 * 64, "tokens": meta["new_facts"]["tokens"], "dropped": 0, "unknown": 0}
    assert sorted(p.name for p in syn.iterdir()) == ["background", "eval", "heldout", "meta.json", "new_facts",
                                                    "pretrain", "tokenizer"]
    assert not list(syn.parent.glob(".*tmp*")), "no temporary folder left behind"
    from smft_dist.data.streaming_compat import import_streaming

    ds = import_streaming().StreamingDataset(local=str(syn / "new_facts"), batch_size=1)
    groups = [ds[i]["group"] for i in range(ds.num_samples)]
    assert groups == sorted(groups) == [i // 64 for i in range(3 * 64)]  # fact order, 64 paraphrases each
    s = ds[0]
    assert s["input_ids"].dtype == np.int32 and s["input_ids"].shape == (SEQ,)
    assert s["attention_mask"].dtype == s["loss_mask"].dtype == np.uint8
    n = int(s["attention_mask"].sum())
    assert s["input_ids"][0] == 1 and s["input_ids"][n - 1] == 2 and (s["input_ids"][n:] == 0).all()
    assert s["loss_mask"].tolist() == [0] + [1] * (n - 1) + [0] * (SEQ - n)
    packed = import_streaming().StreamingDataset(local=str(syn / "pretrain"), batch_size=1)[0]
    assert packed["loss_mask"].all() and packed["attention_mask"].all() and "group" not in packed
    known = load_qa_jsonl(syn / "eval" / "known_qa.jsonl")
    assert len(known) == 30 and {"prompt", "answer", "question"} <= set(known[0])


def test_convert_qa_trains_only_the_answer(tmp_path, syn):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"question": "where was cleo dor rick born ?", "answer": "tulwen"}) + "\n"
                   + json.dumps({"text": "the old man sees the tree ."}) + "\n")
    assert main(["convert", str(src), "--tokenizer", str(syn / "tokenizer"), "--out", str(tmp_path / "ft"),
                 "--seq-len", "16"]) == 0
    tok = load_tokenizer(syn / "tokenizer")
    batch = next(iter(build_dataloader(tmp_path / "ft", 2, shuffle=False, seed=0, rank=0, world_size=1)))
    trained = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.convert_ids_to_tokens(trained.tolist()) == ["tulwen", "</s>"]
    assert (batch["labels"][1] != -100).sum() == 8  # every word of the text and </s>
    assert main(["convert", str(src), "--tokenizer", str(syn / "tokenizer"), "--out", str(tmp_path / "pt"),
                 "--seq-len", "8", "--packed"]) == 0
    b = next(iter(build_dataloader(tmp_path / "pt", 1, shuffle=False, seed=0, rank=0, world_size=1)))
    assert (b["labels"] == b["input_ids"]).all()


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, syn, capsys):
    tok = str(syn / "tokenizer")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "x.csv").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    cases = {"missing.txt": "does not exist", "empty.txt": "empty", "x.csv": "unknown format",
             "bad.jsonl": "expected 'text'"}
    for name, message in cases.items():
        out = tmp_path / f"out_{name}"
        assert main(["convert", str(tmp_path / name), "--tokenizer", tok, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(tmp_path / name) in err, err
        assert not out.exists() and not list(tmp_path.glob(".out_*"))
    assert main(["synthetic", "--out", str(syn)]) == 2
    assert "already exists" in capsys.readouterr().err


def _ids(batch):
    return batch["group"].tolist()


def test_loader_resumes_exactly_across_epochs(tmp_path):
    path = _numbered(tmp_path / "d", 40)  # batch 8: 5 batches per epoch
    loader = build_dataloader(path, 8, shuffle=True, seed=3, rank=0, world_size=1)
    it = forever(loader)
    full = [_ids(next(it)) for _ in range(12)]  # 2.4 epochs
    assert sorted(sum(full[:5], [])) == list(range(40)) and full[:5] != full[5:10]  # reshuffled per epoch
    for cut in (3, 5, 7):  # mid-epoch, exactly at the epoch end, in the 2nd epoch
        first = build_dataloader(path, 8, shuffle=True, seed=3, rank=0, world_size=1)
        it = forever(first)
        head = [_ids(next(it)) for _ in range(cut)]
        state = first.state_dict()
        resumed = build_dataloader(path, 8, shuffle=True, seed=3, rank=0, world_size=1)
        resumed.load_state_dict(state)
        it = forever(resumed)
        assert head + [_ids(next(it)) for _ in range(12 - cut)] == full, f"resume after {cut} batches"
    other = forever(build_dataloader(path, 8, shuffle=True, seed=4, rank=0, world_size=1))
    assert [_ids(next(other)) for _ in range(5)] != full[:5]


def _rank_groups(rank, world_size, path, odd_path, steps):
    out = {}
    for shuffle in (True, False):
        it = forever(build_dataloader(path, 4, shuffle=shuffle, seed=0, rank=rank, world_size=world_size))
        out[shuffle] = [_ids(next(it)) for _ in range(steps)]
    # One evaluation epoch of an uneven dataset: every rank must get the same number of batches.
    loader = build_dataloader(odd_path, 4, shuffle=False, seed=0, rank=rank, world_size=world_size, drop_last=False)
    out["eval"] = [_ids(b) for b in loader]
    return out


@pytest.mark.slow
def test_two_ranks_read_disjoint_complete_partitions(tmp_path):
    path = _numbered(tmp_path / "d", 48)  # 2 ranks x batch 4: 6 steps per epoch
    r0, r1 = run_ranks(_rank_groups, 2, path, _numbered(tmp_path / "odd", 13), 6)
    assert len(r0["eval"]) == len(r1["eval"]) and set(sum(r0["eval"] + r1["eval"], [])) == set(range(13))
    assert sorted(sum(r0[True] + r1[True], [])) == list(range(48)), "disjoint and complete"
    # Unshuffled, global step s is samples [8s, 8s+8): consecutive paraphrases stay one global batch.
    for s in range(6):
        assert sorted(r0[False][s] + r1[False][s]) == list(range(8 * s, 8 * s + 8))


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataloader(tmp_path / "nope", 4, shuffle=False, seed=0, rank=0, world_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MDS index.json"):
        build_dataloader(tmp_path / "empty", 4, shuffle=False, seed=0, rank=0, world_size=1)
    path = _numbered(tmp_path / "small", 3)
    with pytest.raises(DataError, match="no full batch"):
        build_dataloader(path, 4, shuffle=False, seed=0, rank=0, world_size=1)
    batch = next(iter(build_dataloader(path, 4, shuffle=False, seed=0, rank=0, world_size=1, drop_last=False)))
    assert batch["input_ids"].dtype == torch.long and batch["labels"][0].tolist()[:4] == [-100, 0, 2, -100]


@pytest.mark.parametrize("env", [
    {"LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "1"},  # DeepSpeed's ranks in a shell an in-process run left
    {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "2"},                      # a local rank past the ranks per node
    {"LOCAL_WORLD_SIZE": "3", "LOCAL_RANK": "0"},                      # ranks per node not dividing the world
], ids=["deepspeed-stale-local-world", "local-rank-too-large", "local-world-not-dividing"])
def test_launcher_variables_that_contradict_each_other_are_refused(tmp_path, monkeypatch, env):
    """A stale LOCAL_WORLD_SIZE=1 beside DeepSpeed's LOCAL_SIZE=2 made every rank a streaming local
    leader: both registered the same shared-memory name and one crashed ("File exists")."""
    for k in LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", env["LOCAL_RANK"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = _numbered(tmp_path / "d", 32)
    with pytest.raises(DataError, match="left over from the environment the launcher started in"):
        build_dataloader(path, 4, shuffle=False, seed=0, rank=int(env["LOCAL_RANK"]), world_size=4)


def test_stale_resume_block_of_a_killed_job_is_not_picked_up(tmp_path, monkeypatch):
    """A SIGKILLed job leaves `<prefix>_resume` in /dev/shm; a new dataset that gets the same
    prefix must start at the beginning, not at the dead job's position."""
    from smft_dist.data.streaming_compat import import_streaming

    path = _numbered(tmp_path / "numbered", 64)
    first = next(forever(build_dataloader(path, 4, shuffle=True, seed=0, rank=0, world_size=1)))["input_ids"]
    dataset_cls = import_streaming().StreamingDataset
    init = dataset_cls.__init__
    stale = {"epoch": 0, "sample_in_epoch": 12, "num_canonical_nodes": 1, "shuffle_seed": 0,
             "initial_physical_nodes": 1}

    def init_then_plant_stale_block(self, *a, **k):
        init(self, *a, **k)
        self.load_state_dict(stale)  # what a killed job left under the prefix this dataset got
        monkeypatch.setattr(dataset_cls, "__init__", init)

    monkeypatch.setattr(dataset_cls, "__init__", init_then_plant_stale_block)
    again = build_dataloader(path, 4, shuffle=True, seed=0, rank=0, world_size=1)
    assert torch.equal(next(forever(again))["input_ids"], first)
