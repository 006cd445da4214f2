"""The tokenizer `smft-export --tokenizer` writes (issue 23): it loads with AutoTokenizer in the
ways docs/data.md gives, with no remote-code prompt, and encodes exactly as the source tokenizer;
a tokenizer the checkpoint was not trained with is refused."""
import json
import subprocess

import pytest

from smft_dist.data.tokenizer import FINGERPRINT_PROBE, tokenizer_fingerprint
from tests.conftest import PY, ROOT, run_cli
from tests.test_tokenizer_identity import swapped_ids

TEXTS = [FINGERPRINT_PROBE, "where was cleo dor rick born ?", "Q: What is the job of Eli? A:", ""]
PROMPT = "custom code"  # transformers' "... contains custom code which must be executed ..." prompt


@pytest.fixture(scope="module")
def exported(tiny_pretrained, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    run_cli([PY, "-m", "smft_dist.train.export", str(tiny_pretrained), "--out", str(out),
             "--tokenizer", str(tiny_data / "tokenizer")])
    return out


def encode_in_fresh_process(folder, before: str = "", **kwargs) -> tuple[list, str]:
    """(ids of TEXTS, output) from `AutoTokenizer.from_pretrained(folder, **kwargs)` in a new Python
    with stdin closed: a prompt reads EOF at once instead of hanging (the timeout is the backstop)."""
    code = (f"{before}\nimport json, sys\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(folder)!r}, **{kwargs!r})\n"
            f"print('smft_dist imported:', 'smft_dist' in sys.modules)\n"
            f"print(json.dumps([tok(t)['input_ids'] for t in {TEXTS!r}]))\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1]), r.stdout + r.stderr


def source_ids(tiny_data) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    return [tok(t)["input_ids"] for t in TEXTS]


def test_exported_tokenizer_names_its_class(exported):
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"


def test_exported_tokenizer_loads_without_prompt_after_importing_smft(exported, tiny_data):
    ids, output = encode_in_fresh_process(exported, before="import smft_dist.model")
    assert PROMPT not in output, output[-2000:]
    assert ids == source_ids(tiny_data)


def test_exported_tokenizer_loads_without_prompt_or_smft(exported, tiny_data):
    ids, output = encode_in_fresh_process(exported, trust_remote_code=False)
    assert "smft_dist imported: False" in output and PROMPT not in output, output[-2000:]
    assert ids == source_ids(tiny_data)


def test_bare_call_without_stdin_still_loads_the_same_tokenizer(exported, tiny_data):
    """docs/data.md: the bare call prompts (transformers reads config.json's auto_map first), but a
    closed stdin answers no and the tokenizer loads all the same."""
    ids, _ = encode_in_fresh_process(exported)
    assert ids == source_ids(tiny_data)


def test_export_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(tiny_pretrained, tiny_data, tmp_path):
    other = swapped_ids(tiny_data / "tokenizer", tmp_path / "tok_b")
    r = run_cli([PY, "-m", "smft_dist.train.export", str(tiny_pretrained), "--out", str(tmp_path / "hf"),
                 "--tokenizer", str(other)], check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    from smft_dist.data.tokenizer import load_tokenizer

    assert tokenizer_fingerprint(load_tokenizer(other)) in errors[0]
    assert f"--tokenizer {(tiny_data / 'tokenizer').resolve()}" in errors[0]
    assert not (tmp_path / "hf").exists()
