"""What a new user runs into first (issue 23): in-run evaluation keys of files that share a name,
bare list overrides, data written for a larger vocabulary, text the tokenizer does not cover,
`smft-eval` without --tokenizer, NQ-style statements, dropped facts, and the memory plan's verdict."""
import io
import json
import re
from pathlib import Path

import pytest

from smft_dist.data.cli import main as smft_data
from smft_dist.data.streaming_compat import import_streaming
from tests.conftest import PY, ROOT, run_cli

FIX = ROOT / "tests" / "fixtures"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A word-level tokenizer over the NQ fixture and the built-in statement texts."""
    from smft_dist.data import real
    from smft_dist.data.tokenizer import train_word_tokenizer

    texts = (FIX / "nq_open.jsonl").read_text().splitlines()
    texts += real.STATEMENT_TEMPLATES + real.FACT_PREFIXES + real.FACT_SUFFIXES + ["Q: ? A: D.C. washington"]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_word_tokenizer(texts, out)
    return str(out)


def test_qa_files_named_alike_keep_their_own_scores_shown_on_the_console(tok, tmp_path):
    """Two `smft-data facts` outputs (both qa.jsonl) and a known_qa.jsonl: three evaluations under
    three keys, printed by the progress output."""
    from smft_dist.config import load_config
    from smft_dist.model import SmftConfig, SmftForCausalLM
    from smft_dist.train.evaluation import Evaluator
    from smft_dist.train.metrics import MetricLogger

    rows = _lines(FIX / "nq_open.jsonl")
    files = {"tq/qa": rows[:2], "nq/qa": rows[2:5], "known_qa": rows[5:9]}
    for name, part in files.items():
        (tmp_path / f"{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = load_config(ROOT / "configs/model/tiny.yaml",
                      [f"model.tokenizer={tok}", f"data.train={tmp_path}", "eval.every=1", "eval.max_new_tokens=2",
                       f"eval.qa=[{tmp_path}/tq/qa.jsonl,{tmp_path}/nq/qa.jsonl]"])
    cfg.eval.qa.append(f"{tmp_path}/known_qa.jsonl")
    model = SmftForCausalLM(SmftConfig.from_model_config(cfg.model)).eval()
    evaluator = Evaluator(cfg, model)
    assert {k: len(v) for k, v in evaluator.qa.items()} == {k: len(v) for k, v in files.items()}
    scores = evaluator(0)
    assert set(scores) == {f"eval/{m}/{k}" for m in ("qa_f1", "qa_em") for k in files}

    out = io.StringIO()
    logger = MetricLogger(tmp_path / "run", 10, 0, enabled=True, desc="finetune/sparse_memory", stream=out)
    logger.write(0, scores)
    logger.log(1, {"loss": 2.0})  # a step without evaluation prints no scores
    logger.close()
    eval_lines = [line for line in out.getvalue().splitlines() if " eval " in line]
    assert eval_lines == ["finetune/sparse_memory eval step 0/10: " + " ".join(
        f"{k[len('eval/'):]} {v:.4f}" for k, v in scores.items())]
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0]).items() >= scores.items()


def test_a_bare_value_of_a_list_key_is_a_one_element_list_or_an_error_that_shows_the_brackets():
    from smft_dist.config import ConfigError, load_config

    assert load_config(None, ["eval.qa=runs/data/tq/qa.jsonl"]).eval.qa == ["runs/data/tq/qa.jsonl"]
    assert load_config(None, ["lora.targets=q_proj"]).lora.targets == ["q_proj"]
    assert load_config(None, ["eval.qa="]).eval.qa == []
    assert load_config(None, ["eval.qa=[a.jsonl,b.jsonl]"]).eval.qa == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match=re.escape("model.memory_layers is a list: write model.memory_layers=[1]")):
        load_config(None, ["model.memory_layers=1"])


def test_a_run_on_data_written_for_a_larger_vocabulary_fails_at_start_up(tmp_path):
    """Data tokenized with a 600-token vocabulary, a model of 512: one error line naming both
    numbers and the fix, exit 2, before any step (no metrics written)."""
    from smft_dist.data.tokenizer import train_word_tokenizer

    words = [f"w{i}" for i in range(596)]  # + 4 special tokens = 600
    train_word_tokenizer([" ".join(words)], tmp_path / "big")
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[i:i + 40]) for i in range(0, 596, 40)) + "\n")
    assert smft_data(["convert", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "big"),
                      "--out", str(tmp_path / "data"), "--packed", "--seq-len", "32"]) == 0
    r = run_cli([PY, "launchers/train.py", "--config", "configs/tiny/pretrain.yaml", f"data.train={tmp_path}/data",
                 f"out_dir={tmp_path}/run", "steps=2", "logging.progress=false"], check=False, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr[-3000:]
    assert re.fullmatch(rf"error: model.vocab_size=512 but data.train={tmp_path}/data was written for a vocabulary "
                        rf"of 600 tokens .*: set model.vocab_size=600 \(or more\), or rewrite the data with the "
                        rf"model's tokenizer", err[0]), err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_convert_warns_when_the_tokenizer_does_not_cover_the_text(tok, tmp_path, capsys):
    """Words outside the tokenizer's vocabulary become <unk>: over 2% of the tokens written, a
    warning with the count; a text it covers passes silently."""
    from smft_dist.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    (tmp_path / "covered.txt").write_text("who founded the library of karnholm\n" * 20)
    (tmp_path / "foreign.txt").write_text("who founded the bibliothèque de karnholm\n" * 20)
    convert = ["convert", "--tokenizer", tok, "--packed", "--seq-len", "16"]
    assert smft_data([*convert, str(tmp_path / "covered.txt"), "--out", str(tmp_path / "covered")]) == 0
    covered = capsys.readouterr()
    assert "warning" not in covered.err and json.loads(covered.out)["unknown"] == 0
    assert smft_data([*convert, str(tmp_path / "foreign.txt"), "--out", str(tmp_path / "foreign")]) == 0
    foreign = capsys.readouterr()
    info = json.loads(foreign.out)
    # per line: <s> + 6 words + </s> = 8 tokens written, 2 of them unknown (bibliothèque, de)
    assert t("bibliothèque de", add_special_tokens=False)["input_ids"] == [t.unk_token_id] * 2
    assert info["tokens"] == 20 * 8 and info["unknown"] == 20 * 2
    assert f"warning: 25.0% of the tokens written (40 of 160) are the tokenizer's unknown token '<unk>'" in foreign.err


def test_smft_eval_finds_the_tokenizer_of_the_runs_data(tiny_pretrained, tiny_data, tmp_path, capsys):
    """A checkpoint of a run without model.tokenizer (the df index run over tiny_data/background):
    smft-eval takes the tokenizer that data was written with, as in-run evaluation does."""
    from smft_dist.eval.cli import main as smft_eval

    assert smft_eval([str(tiny_pretrained), "--qa", str(tiny_data / "eval/known_qa.jsonl"), "--max-new-tokens", "2",
                      "--device", "cpu", "--json", str(tmp_path / "eval.json")]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert Path(results["tokenizer"]).resolve() == (tiny_data / "tokenizer").resolve()
    assert results["qa"][str(tiny_data / "eval/known_qa.jsonl")]["n"] == 30
    assert re.search(r"qa_f1 +\S+known_qa\.jsonl +\d\.\d{4} +30", capsys.readouterr().out)


def test_nq_questions_make_sentences_and_an_answer_ends_with_one_period():
    from smft_dist.data.real import fact_statements
    from smft_dist.eval.qa import load_qa_jsonl

    rows = load_qa_jsonl(FIX / "nq_open.jsonl")
    rows.append(dict(rows[0], id="dc", question="what is the capital of the united states",
                     answer="Washington, D.C.", answers=["Washington, D.C."]))
    for qa in rows:
        q = qa["question"]
        assert q == q.lower() and not q.endswith("?")  # the NQ layout
        for s in fact_statements(qa, 64, seed=0):
            assert q[0].upper() + q[1:] + "?" in s and q + " " not in s, s
            assert ".." not in s and "?." not in s, s
    assert "the answer is Washington, D.C. That" in " ".join(fact_statements(rows[-1], 64))


def test_dropped_facts_are_named_and_the_kept_groups_numbered_densely(tok, tmp_path, capsys):
    rows = _lines(FIX / "nq_open.jsonl")[:6]
    for i in (1, 3):  # too long for --seq-len 40
        rows[i] = dict(rows[i], question=rows[i]["question"] + " of the library" * 12)
    (tmp_path / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert smft_data(["facts", str(tmp_path / "nq.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "f"),
                      "--paraphrases", "2", "--seq-len", "40", "--on-long", "drop"]) == 0
    err = capsys.readouterr().err
    assert "warning: dropped 2 facts longer than --seq-len (--on-long drop): ids 1, 3 (all in smft_data.json" in err
    info = json.loads((tmp_path / "f/train/smft_data.json").read_text())
    assert info["dropped_ids"] == [1, 3] and info["groups"] == 4
    ds = import_streaming().StreamingDataset(local=str(tmp_path / "f/train"), batch_size=1)
    samples = [ds[i] for i in range(ds.num_samples)]
    assert [s["group"] for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]  # step k+1 learns group k
    qa, statements = _lines(tmp_path / "f/qa.jsonl"), _lines(tmp_path / "f/statements.jsonl")
    assert [(q["id"], q["group"]) for q in qa] == [(0, 0), (2, 1), (4, 2), (5, 3)]
    assert [(s["id"], s["group"]) for s in statements] == [(0, 0), (2, 1), (4, 2), (5, 3)]
    from smft_dist.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    for k, s in enumerate(samples):  # group k's samples are the statements of the fact qa.jsonl gives group k
        n = int(s["attention_mask"].sum())
        want = statements[s["group"]]["paraphrases"][k % 2]
        assert s["input_ids"][1:n - 1].tolist() == t(want, add_special_tokens=False)["input_ids"]


def test_memory_plan_verdict_and_why_a_sparse_finetune_runs_the_plain_engine(capsys):
    from smft_dist.model.inspect import main

    sparse = ["--config", str(ROOT / "configs/paper/finetune_triviaqa_sparse_1p3b.yaml"), "--plan", "--mp", "8",
              "--engine", "deepspeed", "--zero-stage", "2"]
    assert main(sparse) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"total: +(\d+\.\d\d) GB", out).group(1))
    assert total < 72  # 90% of 80 GB
    assert f"fits: {total:.2f} GB of 80 GB per GPU" in out
    assert re.search(r"engine none, dense weights whole on every GPU: this run trains no dense weight, so it runs "
                     r"the plain engine whatever dist.engine \(deepspeed\) says", out), out
    assert main([*sparse, "--gpu-memory", str(total)]) == 0  # no headroom left
    assert f"does not fit: {total:.2f} GB of {total:g} GB per GPU" in capsys.readouterr().out
    # --activation-checkpointing is a flag; it shrinks the activations of a pretraining plan
    pretrain = ["--config", str(ROOT / "configs/paper/pretrain_1p3b.yaml"), "--plan", "--mp", "8", "--json"]
    assert main(pretrain) == 0 and main([*pretrain, "--activation-checkpointing"]) == 0
    full, recomputed = (json.loads(line)["plan"] for line in capsys.readouterr().out.splitlines())
    assert recomputed["settings"]["activation_checkpointing"] and not full["settings"]["activation_checkpointing"]
    assert recomputed["parts"]["activations"] < full["parts"]["activations"]
    assert full["engine_note"] is None and full["verdict"].startswith("fits: ")
