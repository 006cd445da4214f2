"""Tokenizer identity (issue 23): `smft-data` records a tokenizer fingerprint in smft_data.json, a
run's checkpoints record the one their weights were trained for, and a run starting from them or
smft-eval refuses a tokenizer whose ids differ, before any step and writing nothing."""
import json
import shutil
from pathlib import Path

from smft_dist.data.tokenizer import FINGERPRINT_KEY, load_tokenizer, tokenizer_fingerprint, train_word_tokenizer
from tests.conftest import PY, latest_dir, run_cli

TEXTS = ["The cat sat on the mat.", "A dog ran to the park, and the cat slept."]


def swapped_ids(src: Path, dst: Path) -> Path:
    """A copy of the word-level tokenizer folder `src` whose two lowest non-special words trade ids:
    the same words, the same size, two ids differ."""
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted((w for w, i in vocab.items() if i >= 4), key=vocab.get)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def resaved(src: Path, dst: Path) -> Path:
    load_tokenizer(src).save_pretrained(str(dst))
    return dst


def test_fingerprint_is_kept_by_a_resave_and_changed_by_an_id(tmp_path):
    trained = train_word_tokenizer(TEXTS, tmp_path / "a")
    fp = tokenizer_fingerprint(load_tokenizer(tmp_path / "a"))
    assert tokenizer_fingerprint(trained) == fp  # the object smft-data synthetic writes with
    assert tokenizer_fingerprint(load_tokenizer(resaved(tmp_path / "a", tmp_path / "resaved"))) == fp
    assert tokenizer_fingerprint(load_tokenizer(swapped_ids(tmp_path / "a", tmp_path / "swapped"))) != fp
    # The same vocabulary mapping without lowercasing: "The" becomes <unk>, which the probe text shows.
    shutil.copytree(tmp_path / "a", tmp_path / "cased")
    tj = json.loads((tmp_path / "cased" / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "NFKC"}
    (tmp_path / "cased" / "tokenizer.json").write_text(json.dumps(tj))
    cased = load_tokenizer(tmp_path / "cased")
    assert cased.get_vocab() == trained.get_vocab()
    assert tokenizer_fingerprint(cased) != fp


def _convert(tokenizer: Path, qa: Path, out: Path) -> Path:
    run_cli([PY, "-m", "smft_dist.data.cli", "convert", str(qa), "--tokenizer", str(tokenizer), "--out", str(out),
             "--seq-len", "32"])
    return out


def _finetune(init_from: Path, data: Path, out_dir: Path, *overrides, check=True):
    """One full-finetuning step from `init_from` on `data`."""
    return run_cli([PY, "launchers/train.py", "--config", "configs/tiny/finetune_full.yaml", f"out_dir={out_dir}",
                    f"model.init_from={init_from}", f"data.train={data}", "steps=1", "data.batch_size=4",
                    "logging.progress=false", *overrides], check=check)


def test_smft_data_and_checkpoints_record_the_fingerprint(tiny_data, tiny_pretrained):
    fp = tokenizer_fingerprint(load_tokenizer(tiny_data / "tokenizer"))
    for part in ("pretrain", "background", "heldout", "new_facts"):
        assert json.loads((tiny_data / part / "smft_data.json").read_text())[FINGERPRINT_KEY] == fp
    meta = json.loads((latest_dir(tiny_pretrained) / "meta.json").read_text())
    assert meta[FINGERPRINT_KEY] == fp
    assert meta["tokenizer_folder"] == str((tiny_data / "tokenizer").resolve())


def test_run_refuses_data_of_another_tokenizer_before_any_step(tiny_data, tiny_pretrained, tmp_path):
    other = swapped_ids(tiny_data / "tokenizer", tmp_path / "tok_b")
    data = _convert(other, tiny_data / "eval" / "new_qa.jsonl", tmp_path / "data_b")
    r = _finetune(tiny_pretrained, data, tmp_path / "run", check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    model_fp = tokenizer_fingerprint(load_tokenizer(tiny_data / "tokenizer"))
    assert tokenizer_fingerprint(load_tokenizer(other)) in errors[0] and model_fp in errors[0]
    assert "--tokenizer" in errors[0] and "checkpoint.allow_tokenizer_change" in errors[0]
    assert not (tmp_path / "run").exists()  # no config.yaml, ledger or checkpoint

    # The opt-in trains, and its checkpoint records the tokenizer of the data it trained on.
    r = _finetune(tiny_pretrained, data, tmp_path / "run_allowed", "checkpoint.allow_tokenizer_change=true")
    assert "continuing (checkpoint.allow_tokenizer_change)" in r.stderr, r.stderr[-2000:]
    meta = json.loads((latest_dir(tmp_path / "run_allowed" / "checkpoints") / "meta.json").read_text())
    assert meta[FINGERPRINT_KEY] == tokenizer_fingerprint(load_tokenizer(other))


def test_run_accepts_data_of_the_resaved_tokenizer(tiny_data, tiny_pretrained, tmp_path):
    same = resaved(tiny_data / "tokenizer", tmp_path / "tok_resaved")
    data = _convert(same, tiny_data / "eval" / "new_qa.jsonl", tmp_path / "data")
    r = _finetune(tiny_pretrained, data, tmp_path / "run")
    assert "fingerprint" not in r.stderr, r.stderr[-2000:]  # neither refused nor warned
    meta = json.loads((latest_dir(tmp_path / "run" / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == 1
    assert meta[FINGERPRINT_KEY] == tokenizer_fingerprint(load_tokenizer(tiny_data / "tokenizer"))
    assert meta["tokenizer_folder"] == str(same.resolve())


def test_data_written_before_fingerprints_trains_with_a_warning(tiny_data, tiny_pretrained, tmp_path):
    data = _convert(tiny_data / "tokenizer", tiny_data / "eval" / "new_qa.jsonl", tmp_path / "data")
    info = json.loads((data / "smft_data.json").read_text())
    del info[FINGERPRINT_KEY]
    (data / "smft_data.json").write_text(json.dumps(info))
    r = _finetune(tiny_pretrained, data, tmp_path / "run")
    assert "records no tokenizer fingerprint" in r.stderr and str(data) in r.stderr, r.stderr[-2000:]
    # the checkpoint keeps the fingerprint of the weights it started from: the next run can still check
    meta = json.loads((latest_dir(tmp_path / "run" / "checkpoints") / "meta.json").read_text())
    assert meta[FINGERPRINT_KEY] == tokenizer_fingerprint(load_tokenizer(tiny_data / "tokenizer"))


def test_smft_eval_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(tiny_data, tiny_pretrained, tmp_path):
    other = swapped_ids(tiny_data / "tokenizer", tmp_path / "tok_b")
    r = run_cli([PY, "-m", "smft_dist.eval.cli", str(tiny_pretrained), "--tokenizer", str(other),
                 "--qa", str(tiny_data / "eval" / "new_qa.jsonl"), "--json", str(tmp_path / "eval.json")], check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert tokenizer_fingerprint(load_tokenizer(other)) in errors[0]
    assert f"--tokenizer {(tiny_data / 'tokenizer').resolve()}" in errors[0]
    assert not (tmp_path / "eval.json").exists()


def test_checkpoint_written_before_fingerprints_is_evaluated_with_a_warning(tiny_data, tiny_pretrained, tmp_path,
                                                                            caplog):
    from smft_dist.eval.cli import load_eval_model

    old = tmp_path / "step_old"
    shutil.copytree(latest_dir(tiny_pretrained), old)
    meta = json.loads((old / "meta.json").read_text())
    del meta[FINGERPRINT_KEY], meta["tokenizer_folder"]
    (old / "meta.json").write_text(json.dumps(meta))  # meta.json is outside the manifest: still intact
    model, tok = load_eval_model(old, tokenizer=str(tiny_data / "tokenizer"), device="cpu")
    assert f"checkpoint {old} (its meta.json) records no tokenizer fingerprint" in caplog.text
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(load_tokenizer(tiny_data / "tokenizer"))
