"""Folders the commands write are never replaced unasked, and a refused command leaves nothing:
`smft-retrofit` and `smft-export` refuse an existing `--out` without `--overwrite` (one `error:`
line, exit 2, the folder byte-identical) and with it swap the new folder in whole; `smft-patch
apply --out D` refused leaves no D and names the model it was given."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from smft_dist.model.retrofit import main as retrofit_main
from smft_dist.patch.cli import main as patch_main
from smft_dist.patch.ledger import RowUpdate, StepRecord
from smft_dist.patch.patch import Patch
from smft_dist.train.export import main as export_main
from tests.reliability.conftest import tree_digest
from tests.test_retrofit import small_llama

MEMORY_FLAGS = ["--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "16", "--value-dim", "32"]


@pytest.fixture(scope="module")
def dense_dir(tiny_data, tmp_path_factory):
    """A random LlamaForCausalLM with the tiny data's tokenizer (as tests/test_retrofit.py)."""
    out = tmp_path_factory.mktemp("dense") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(small_llama(num_hidden_layers=2)).save_pretrained(out)
    for f in (tiny_data / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def another_models_folder(path):
    """An existing output folder the user cares about (another model's export, with its tokenizer)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "other"}\n')
    (path / "tokenizer.json").write_text('{"the": "other model\'s tokenizer"}\n')
    return tree_digest(path)


def assert_refused(rc, err, out, before):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(out) in lines[0] and "--overwrite" in lines[0], err
    assert tree_digest(out) == before  # nothing changed, nothing added
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left beside it


def test_retrofit_refuses_an_existing_out_and_overwrite_replaces_it(dense_dir, tmp_path, capsys):
    out = tmp_path / "smft"
    before = another_models_folder(out)
    argv = ["--model", str(dense_dir), "--out", str(out), "--layers", "1", *MEMORY_FLAGS]
    rc = retrofit_main(argv)
    assert_refused(rc, capsys.readouterr().err, out, before)

    assert retrofit_main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "smft"
    assert (out / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    assert (out / "model.yaml").is_file() and not list(out.parent.glob(f".{out.name}.*"))


def test_export_refuses_an_existing_out_and_overwrite_replaces_it(tiny_pretrained, tiny_data, tmp_path, capsys):
    out = tmp_path / "hf"
    before = another_models_folder(out)
    argv = [str(tiny_pretrained), "--out", str(out), "--tokenizer", str(tiny_data / "tokenizer")]
    rc = export_main(argv)
    assert_refused(rc, capsys.readouterr().err, out, before)

    assert export_main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "smft"
    assert (out / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer" / "tokenizer.json").read_bytes()
    assert (out / "background_df").is_dir() and not list(out.parent.glob(f".{out.name}.*"))


def test_patch_apply_out_refused_leaves_no_out_and_names_the_model(dense_dir, tmp_path, capsys):
    model = tmp_path / "smft"
    assert retrofit_main(["--model", str(dense_dir), "--out", str(model), "--layers", "1", *MEMORY_FLAGS]) == 0
    capsys.readouterr()  # its progress bars

    values_RD = load_file(str(model / "model.safetensors"))["model.layers.1.mlp.memory.values.weight"]
    ids_U = torch.tensor([3, 7])
    config = json.loads((model / "config.json").read_text())

    def patch_file(name, before_UD):
        step = StepRecord(1, [0], ["0" * 64], {"layer1": RowUpdate(ids_U, before_UD, before_UD + 1)})
        meta = {"model": config, "layers": ["layer1"], "num_rows": values_RD.shape[0], "dim": values_RD.shape[1],
                "dtype": str(values_RD.dtype)}
        return str(Patch(meta, [step]).save(tmp_path / name))

    untouched = tree_digest(model)
    # made on another model: its base rows are not this model's rows, so apply refuses
    refused, out = patch_file("other.smftpatch", values_RD[ids_U] + 5), tmp_path / "patched"
    assert patch_main(["apply", refused, str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"{model}: layer1 rows [3, 7]" in err and str(out) not in err, err
    assert not out.exists() and not list(tmp_path.glob(".patched.*")) and tree_digest(model) == untouched

    # made on this model: the copy at --out gets the patch, the model stays as it was
    assert patch_main(["apply", patch_file("mine.smftpatch", values_RD[ids_U]), str(model), "--out", str(out)]) == 0
    patched_RD = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.memory.values.weight"]
    assert torch.equal(patched_RD[ids_U], values_RD[ids_U] + 1) and tree_digest(model) == untouched


def test_model_yaml_names_the_retrofit_absolutely(dense_dir, tmp_path, monkeypatch):
    """`--out retro` given relative to one folder: the model.yaml it writes still names the folder when
    a run loads it from another working directory (it wrote `init_from: retro` before)."""
    from smft_dist.config import load_config

    monkeypatch.chdir(tmp_path)
    assert retrofit_main(["--model", str(dense_dir), "--out", "retro", "--layers", "1", *MEMORY_FLAGS]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(tmp_path / "retro" / "model.yaml"))
    assert cfg.model.init_from == str(tmp_path / "retro") and (tmp_path / "retro" / "config.json").is_file()
