"""Real datasets' field layouts in (tests/fixtures), evaluation out: `smft-data facts/docs/convert`,
the loader's dataset fingerprint, `smft-eval`, and an end-to-end run from the fixtures."""
import gzip
import json
import re

import numpy as np
import pytest

from smft_dist.data.cli import main as smft_data
from smft_dist.data.loader import DataError, build_dataloader, forever
from smft_dist.data.streaming_compat import import_streaming
from smft_dist.eval.qa import f1_score, load_qa_jsonl
from tests.conftest import PY, ROOT, run_cli, skip_unless_ci
from tests.test_data import _numbered

FIX = ROOT / "tests" / "fixtures"


def _rows(name):
    return [json.loads(line) for line in (FIX / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A word-level tokenizer over the fixtures and every built-in template (a stand-in for the
    model's tokenizer: any Hugging Face tokenizer folder works the same way)."""
    from smft_dist.data import documents, real
    from smft_dist.data.tokenizer import train_word_tokenizer

    texts = [line for name in ("triviaqa", "nq_open", "simpleqa", "documents")
             for line in (FIX / f"{name}.jsonl").read_text().splitlines()]
    texts += real.STATEMENT_TEMPLATES + real.FACT_PREFIXES + real.FACT_SUFFIXES + documents.PREFIXES
    texts.append("Q: What does the text say about ? A:")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_word_tokenizer(texts, out)
    return str(out)


def _samples(folder):
    ds = import_streaming().StreamingDataset(local=str(folder), batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def _unique(values):
    return list(dict.fromkeys(v for v in values if v))


def test_every_layout_keeps_every_accepted_answer():
    for qa, row in zip(load_qa_jsonl(FIX / "triviaqa.jsonl"), _rows("triviaqa")):
        a = row["answer"]
        assert qa["id"] == row["question_id"] and qa["question"] == row["question"] and qa["answer"] == a["value"]
        assert qa["answers"] == _unique([a["value"], *a["aliases"], *a["normalized_aliases"]])
        assert f1_score(a["aliases"][-1], qa["answers"]) == 1.0  # an alias, not the value, scores fully
    for i, (qa, row) in enumerate(zip(load_qa_jsonl(FIX / "nq_open.jsonl"), _rows("nq_open"))):
        assert qa["id"] == i and qa["answers"] == row["answer"]
        assert f1_score(row["answer"][-1], qa["answers"]) == 1.0
    for qa, row in zip(load_qa_jsonl(FIX / "simpleqa.jsonl"), _rows("simpleqa")):
        assert qa["question"] == row["problem"] and qa["answers"] == [row["answer"]]
        assert qa["metadata"] == row["metadata"] and qa["prompt"] == f"Q: {row['problem']} A:"


def test_facts_groups_of_padded_paraphrases_from_jsonl_and_a_datasets_folder(tok, tmp_path):
    import datasets

    args = ["--tokenizer", tok, "--paraphrases", "4", "--seq-len", "48", "--limit", "30"]
    assert smft_data(["facts", str(FIX / "triviaqa.jsonl"), "--out", str(tmp_path / "a"), *args]) == 0
    samples = _samples(tmp_path / "a" / "train")
    assert [s["group"] for s in samples] == [i // 4 for i in range(30 * 4)]  # a fact's paraphrases consecutive
    statements = [json.loads(line) for line in (tmp_path / "a" / "statements.jsonl").read_text().splitlines()]
    from smft_dist.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    for k, s in enumerate(samples[:8]):
        n = int(s["attention_mask"].sum())
        assert s["input_ids"].shape == (48,) and (s["input_ids"][n:] == t.pad_token_id).all()  # padded to 48
        assert s["input_ids"][0] == t.bos_token_id and s["input_ids"][n - 1] == t.eos_token_id
        assert s["loss_mask"].tolist() == [0] + [1] * (n - 1) + [0] * (48 - n)  # the whole statement trains
        text = statements[s["group"]]["paraphrases"][k % 4]
        assert t.decode(s["input_ids"][1:n - 1].tolist()) == t.decode(t(text, add_special_tokens=False)["input_ids"])
    assert all(len(set(st["paraphrases"])) == 4 for st in statements)
    qa = [json.loads(line) for line in (tmp_path / "a" / "qa.jsonl").read_text().splitlines()]
    assert [q["answers"] for q in qa] == [q["answers"] for q in load_qa_jsonl(FIX / "triviaqa.jsonl")]
    info = json.loads((tmp_path / "a" / "train" / "smft_data.json").read_text())
    assert info["seq_len"] == 48 and info["pad_token_id"] == t.pad_token_id and info["groups"] == 30
    # The same rows as a `datasets` save_to_disk folder give the same shards.
    datasets.Dataset.from_list(_rows("triviaqa")).save_to_disk(str(tmp_path / "hf"))
    assert smft_data(["facts", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), *args]) == 0
    for x, y in zip(samples, _samples(tmp_path / "b" / "train"), strict=True):
        assert np.array_equal(x["input_ids"], y["input_ids"]) and x["group"] == y["group"]
    assert smft_data(["facts", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c"), *args[:-1], "10"]) == 0
    assert len(_samples(tmp_path / "c" / "train")) == 10 * 4


def test_facts_from_a_paraphrases_file_and_examples_that_do_not_fit(tok, tmp_path, capsys):
    nq, sqa = str(FIX / "nq_open.jsonl"), str(FIX / "simpleqa.jsonl")
    para = tmp_path / "para.jsonl"
    para.write_text("".join(json.dumps({"id": i, "paraphrases": [f"{r['question']} : {a}" for a in r["answer"][:1] * 3]})
                            + "\n" for i, r in enumerate(_rows("nq_open"))))
    base = ["--tokenizer", tok, "--paraphrases", "3"]
    assert smft_data(["facts", nq, "--out", str(tmp_path / "p"), "--paraphrases-file", str(para), *base]) == 0
    assert len(_samples(tmp_path / "p" / "train")) == 90
    para.write_text(para.read_text().splitlines()[0] + "\n")
    assert smft_data(["facts", nq, "--out", str(tmp_path / "q"), "--paraphrases-file", str(para), *base]) == 2
    assert "no entry for fact id 1" in capsys.readouterr().err
    # Too long for --seq-len: an error naming the example and the length it needs ...
    assert smft_data(["facts", nq, sqa, "--out", str(tmp_path / "r"), "--seq-len", "30", *base]) == 2
    err = capsys.readouterr().err
    m = re.search(r"error: (\S+simpleqa\.jsonl:\d+) \(fact (\d+), paraphrase \d\).* needs (\d+) tokens but --seq-len "
                  r"is 30", err)
    assert m and int(m.group(3)) > 30 and not (tmp_path / "r").exists(), err
    # ... or dropped, whole facts, with a warning that counts them.
    assert smft_data(["facts", nq, sqa, "--out", str(tmp_path / "r"), "--seq-len", "30", "--on-long", "drop",
                      *base]) == 0
    out = capsys.readouterr()
    info = json.loads(out.out)
    assert info["dropped"] > 0 and f"dropped {info['dropped']} facts" in out.err
    kept = [json.loads(line)["group"] for line in (tmp_path / "r" / "qa.jsonl").read_text().splitlines()]
    assert len(kept) == 60 - info["dropped"] == info["groups"]
    assert sorted({s["group"] for s in _samples(tmp_path / "r" / "train")}) == kept


def test_docs_chunks_within_the_limit_and_groups_of_augmentations(tok, tmp_path):
    from smft_dist.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    assert smft_data(["docs", str(FIX / "documents.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "d"),
                      "--chunk-tokens", "40", "--augmentations", "4", "--seq-len", "128"]) == 0
    chunks = [json.loads(line) for line in (tmp_path / "d" / "chunks.jsonl").read_text().splitlines()]
    for doc in _rows("documents"):
        mine = [c for c in chunks if c["doc_id"] == doc["id"]]
        assert " ".join(c["text"].replace("\n\n", " ") for c in mine) == " ".join(doc["text"].split())
        assert all(len(t(c["text"], add_special_tokens=False)["input_ids"]) <= 40 for c in mine)
        assert all(c["augmentations"][0] == c["text"] and len(set(c["augmentations"])) == 4 for c in mine)
    samples = _samples(tmp_path / "d" / "train")
    assert [s["group"] for s in samples] == [i // 4 for i in range(len(chunks) * 4)]
    aug = tmp_path / "aug.jsonl"
    aug.write_text("".join(json.dumps({"id": c["id"], "augmentations": [c["text"], c["text"].upper()]}) + "\n"
                           for c in chunks))
    assert smft_data(["docs", str(FIX / "documents.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "e"),
                      "--chunk-tokens", "40", "--augmentations", "2", "--augmentations-file", str(aug)]) == 0
    assert len(_samples(tmp_path / "e" / "train")) == 2 * len(chunks)


def test_convert_reads_compressed_and_parquet_inputs_in_parallel_and_uploads(tok, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = [f"{r['question']} {r['answer'][0]} ({i})" for i in range(70) for r in _rows("nq_open")]  # 2100 rows
    body = "".join(json.dumps({"text": x}) + "\n" for x in lines)
    (tmp_path / "c.jsonl").write_text(body)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    pq.write_table(pa.table({"text": lines}), tmp_path / "c.parquet")
    common = ["--tokenizer", tok, "--seq-len", "32"]
    outs = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        assert smft_data(["convert", str(tmp_path / name), "--out", str(tmp_path / f"o_{name}"), *common]) == 0
        outs[name] = [s["input_ids"].tolist() for s in _samples(tmp_path / f"o_{name}")]
    assert len(outs["c.jsonl"]) == 2100 and all(v == outs["c.jsonl"] for v in outs.values())
    # Two workers: disjoint blocks of rows into part folders, one merged index, the same samples.
    assert smft_data(["convert", str(tmp_path / "c.jsonl.zst"), "--out", str(tmp_path / "w2"), "--workers", "2",
                      "--remote", str(tmp_path / "remote"), *common]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["workers"] == 2
    index = json.loads((tmp_path / "w2" / "index.json").read_text())
    assert {s["raw_data"]["basename"].split("/")[0] for s in index["shards"]} == {"part_000", "part_001"}
    parallel = [s["input_ids"].tolist() for s in _samples(tmp_path / "w2")]
    assert sorted(parallel) == sorted(outs["c.jsonl"])
    # The remote copy (a folder standing in for s3://...) streams the same samples through a cache.
    streamed = import_streaming().StreamingDataset(local=str(tmp_path / "cache"), remote=str(tmp_path / "remote"),
                                                   batch_size=1)
    assert [streamed[i]["input_ids"].tolist() for i in range(streamed.num_samples)] == parallel
    # A token id the model cannot embed is refused while converting, naming the id and the row.
    assert smft_data(["convert", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "v"), "--vocab-size", "40",
                      *common]) == 2
    err = capsys.readouterr().err
    m = re.search(r"c\.jsonl:(\d+): token id (\d+) \('.*'\) is >= vocab_size 40", err)
    assert m and int(m.group(1)) == 1 and int(m.group(2)) >= 40 and not (tmp_path / "v").exists(), err


def test_a_saved_position_only_resumes_on_its_own_dataset(tmp_path):
    a, b = _numbered(tmp_path / "a", 32), _numbered(tmp_path / "b", 32, offset=100)
    first = build_dataloader(a, 4, shuffle=True, seed=0, rank=0, world_size=1)
    it = forever(first)
    [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state["dataset"]["path"] == a and len(state["dataset"]["fingerprint"]) == 16
    other = build_dataloader(b, 4, shuffle=True, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=rf"dataset {a} \(index fingerprint \w+\) but this run reads {b} "
                                        rf"\(fingerprint \w+\).*model.init_from"):
        other.load_state_dict(state)
    same = build_dataloader(a, 4, shuffle=True, seed=0, rank=0, world_size=1)
    same.load_state_dict(state)
    assert next(forever(same))["group"].tolist() == next(it)["group"].tolist()


def _write_mc_task(folder, tok_dir):
    """A 2-choice lm-eval task made locally: a JSONL and its task YAML."""
    rows = [{"question": r["question"], "choices": [r["answer"][0], "the old stone bridge"], "label": 0}
            for r in _rows("nq_open")[:6]]
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "smft_local_mc.yaml").write_text(
        "task: smft_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}} A:\"\ndoc_to_target: label\ndoc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return rows


def test_lm_eval_task_made_locally_matches_our_own_scoring(tok, tmp_path):
    from smft_dist.eval.lm_eval_adapter import lm_eval_available, run_lm_eval

    if not lm_eval_available():
        skip_unless_ci("lm-eval is not installed (optional extra: pip install -e '.[lmeval]')")
    import torch

    from smft_dist.data.tokenizer import load_tokenizer
    from smft_dist.model import SmftConfig, SmftForCausalLM

    t = load_tokenizer(tok)
    torch.manual_seed(0)
    model = SmftForCausalLM(SmftConfig(vocab_size=len(t), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64, memory_layers=[1],
                                       memory_n_keys=8, memory_heads=2, memory_knn=4, memory_k_dim=16,
                                       memory_value_dim=32, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                                       eos_token_id=t.eos_token_id)).eval()
    rows = _write_mc_task(tmp_path / "task", tok)
    res = run_lm_eval(model, t, ["smft_local_mc"], include_path=str(tmp_path / "task"), batch_size=2, device="cpu")
    # Our own log-likelihood of each choice after its context, the same way lm-eval scores it.
    correct = 0
    for r in rows:
        ctx = t(f"Q: {r['question']} A:")["input_ids"]
        scores = []
        for choice in r["choices"]:
            cont = t(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logp[len(ctx) - 1 + j, c].item() for j, c in enumerate(cont)))
        correct += int(np.argmax(scores) == r["label"])
    assert res["smft_local_mc"]["acc,none"] == pytest.approx(correct / len(rows))


TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launchers/train.py"]


@pytest.mark.slow
def test_fixtures_to_two_rank_sparse_finetune_to_smft_eval(tok, tmp_path, capsys):
    """smft-data facts + docs from the fixtures, a 2-rank sparse finetune on the facts, smft-eval
    of its sharded checkpoint on the NQ-layout file (every alias scored) and on held-out MDS;
    resuming the run onto the documents fails with the fingerprint message."""
    from smft_dist.eval.cli import evaluate_model, load_eval_model
    from smft_dist.eval.cli import main as smft_eval
    from smft_dist.train.export import export

    assert smft_data(["facts", str(FIX / "triviaqa.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "facts"),
                      "--paraphrases", "4", "--seq-len", "48"]) == 0
    assert smft_data(["docs", str(FIX / "documents.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "docs"),
                      "--chunk-tokens", "40", "--augmentations", "4", "--seq-len", "128"]) == 0
    run = [*TORCHRUN, "--config", "configs/tiny/finetune_sparse.yaml", f"out_dir={tmp_path}/run", "model.init_from=null",
           f"model.tokenizer={tok}", "selection.mode=tf", "data.seq_len=48", "data.batch_size=2",
           "checkpoint.every=2", "logging.progress=false", "data.one_group_per_batch=true"]
    # 4 facts, one per global batch of 2 x 2 (checked at start-up), evaluated in the run every 2 steps
    run_cli([*run, f"data.train={tmp_path}/facts/train", "steps=4", "eval.every=2", "eval.max_new_tokens=3",
             f"eval.qa=[{tmp_path}/facts/qa.jsonl]", f"eval.nll={tmp_path}/docs/train"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and all(0 < r["rows_updated"] <= 50 for r in lines[1:])
    evals = {r["step"]: r for r in lines if "eval/qa_f1/facts/qa" in r}
    assert sorted(evals) == [0, 2, 4] and all(r["eval/nll/train"] > 0 for r in evals.values())

    r = run_cli([PY, "-m", "smft_dist.eval.cli", str(tmp_path / "run" / "checkpoints"),  # tokenizer: model.tokenizer
                 "--qa", str(FIX / "nq_open.jsonl"), "--nll", str(tmp_path / "docs" / "train"),
                 "--max-new-tokens", "3", "--json", str(tmp_path / "eval.json")])
    assert re.search(r"qa_f1 +\S+nq_open\.jsonl +\d\.\d{4} +30", r.stdout), r.stdout
    results = json.loads((tmp_path / "eval.json").read_text())
    nq = results["qa"][str(FIX / "nq_open.jsonl")]
    gold = {i: row["answer"] for i, row in enumerate(_rows("nq_open"))}
    assert nq["n"] == 30 and {p["id"]: p["answers"] for p in nq["predictions"]} == gold  # every alias scored
    assert nq["f1"] == pytest.approx(sum(f1_score(p["prediction"], gold[p["id"]]) for p in nq["predictions"]) / 30)
    assert results["nll"][str(tmp_path / "docs" / "train")]["tokens"] > 0
    # The exported Hugging Face folder (with its tokenizer) answers exactly as the sharded checkpoint.
    export(tmp_path / "run" / "checkpoints", tmp_path / "hf", tok)
    model, t = load_eval_model(tmp_path / "hf", device="cpu")  # its own tokenizer
    hf = evaluate_model(model, t, qa=[FIX / "nq_open.jsonl"], max_new_tokens=3)["qa"][str(FIX / "nq_open.jsonl")]
    assert [p["prediction"] for p in hf["predictions"]] == [p["prediction"] for p in nq["predictions"]]

    # data.seq_len is a training key (refused on resume unless allowed): past that, the data position names the data
    r = run_cli([*run, f"data.train={tmp_path}/docs/train", "data.seq_len=128", "steps=6",
                 "checkpoint.allow_config_change=true"], check=False)
    assert r.returncode != 0, r.stderr[-3000:]  # each rank prints one error line and exits 2 (torchrun then 1)
    assert re.search(rf"error: the saved data position is in dataset {tmp_path}/facts/train \(index fingerprint \w+\) "
                     rf"but this run reads {tmp_path}/docs/train", r.stderr), r.stderr[-2000:]

    capsys.readouterr()
    assert smft_eval([str(tmp_path / "run" / "checkpoints"), "--qa", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: input") and "missing.jsonl" in err[0]


def test_data_seq_len_must_match_the_written_samples(tok, tmp_path):
    from smft_dist.config import ConfigError, check_paths, load_config

    assert smft_data(["facts", str(FIX / "nq_open.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "f"),
                      "--paraphrases", "2", "--seq-len", "40"]) == 0
    base = ROOT / "configs" / "tiny" / "finetune_sparse.yaml"
    check_paths(load_config(base, [f"data.train={tmp_path}/f/train", "data.seq_len=40", "model.init_from=null"]))
    with pytest.raises(ConfigError, match=r"data.seq_len=32 but data.train=\S+ holds samples of 40 tokens"):
        check_paths(load_config(base, [f"data.train={tmp_path}/f/train", "data.seq_len=32", "model.init_from=null"]))


def test_stream_chunk_of_smft_data_facts_reads_its_train_folder_and_qa(tok, tmp_path):
    """A `smft-data facts` output as a stream chunk: its train/ folder is the data, its qa.jsonl is
    evaluated, and `steps` is one pass (30 facts x 4 paraphrases over a global batch of 4)."""
    from smft_dist.continual.stream import chunk_config

    assert smft_data(["facts", str(FIX / "nq_open.jsonl"), "--tokenizer", tok, "--out", str(tmp_path / "part0"),
                      "--paraphrases", "4", "--seq-len", "48"]) == 0
    cfg = chunk_config([str(ROOT / "configs/tiny/finetune_sparse.yaml")], ["data.seq_len=48", "data.batch_size=2"],
                       tmp_path / "part0", 0, tmp_path / "stream", "runs/base/checkpoints", ["nq.jsonl"], None,
                       world_size=2)
    assert cfg.data.train == str(tmp_path / "part0" / "train") and cfg.steps == 30 * 4 // 4
    assert cfg.eval.qa == [str(tmp_path / "part0" / "qa.jsonl"), "nq.jsonl"] and cfg.eval.every == cfg.steps
    assert cfg.model.init_from == "runs/base/checkpoints" and cfg.out_dir == str(tmp_path / "stream" / "chunk_0")
