"""Every wrong input gets one line: each console script, and the training launcher, given each kind
of file it reads in four damaged forms (truncated, garbage, empty, a valid file of the wrong kind),
and each numeric argument out of range, exits 2 with exactly one `error:` line naming the problem,
no traceback, and nothing written: the case's whole folder (its inputs and the output location) is
byte-identical afterwards.

The cases are generated from small tables (`COMMANDS`: what each command reads; `KINDS`: the
files of each kind of input and a valid file of another kind for each; `DAMAGES`; `NUMBERS`: each
command's numeric options and values out of range), so their count is derived, not typed; docs/reliability.md states it (`test_the_docs_state_the_table_size`).
Everything runs in-process through each script's `main(argv)`, the `console_script` wrapper a
user's console script runs: the launcher is `smft_dist.train.loop.main`, what launchers/train.py
calls (its own subprocess path is covered by test_bad_input.py).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from smft_dist.data.cli import main as _data
from smft_dist.eval.cli import main as _eval
from smft_dist.model.inspect import main as _inspect
from smft_dist.model.retrofit import main as _retrofit
from smft_dist.patch.cli import main as _patch
from smft_dist.train.export import main as _export
from smft_dist.train.loop import main as _train  # what launchers/train.py runs
from tests.conftest import ROOT
from tests.reliability.conftest import SMALL, config_args, single_process_env, tree_digest


@pytest.fixture(autouse=True)
def _release_streaming_shared_memory(monkeypatch):
    """Each case runs its command in this one pytest process, where a user runs one per process.
    mosaicml-streaming keeps a dataset's shared-memory blocks open until the process exits (an
    atexit handler per block), and each new dataset opens the earlier ones' prefix blocks too, so
    hundreds of runs in one process would use up its file descriptors (about 20,000 after this
    module). Release each case's blocks when the case ends, as the user's process exit would."""
    from types import SimpleNamespace

    from smft_dist.data.streaming_compat import import_streaming

    import_streaming()
    import streaming.base.shared.memory as shared_memory

    cleanups = []
    monkeypatch.setattr(shared_memory, "atexit", SimpleNamespace(register=cleanups.append))
    yield
    for cleanup in reversed(cleanups):
        cleanup()

DAMAGES = ("truncated", "garbage", "empty", "wrong_kind")


@dataclass(frozen=True)
class Kind:
    """A kind of input: the files of it that a command reads (paths inside the input; "" for a
    single file) and, for each, a valid file of another kind (a path in the `inputs` fixture)
    that the wrong_kind damage puts in its place. `wrong_folder`: an input of another kind given
    whole in place of a folder input. `damages`: the DAMAGES that can be told from an intact input."""
    files: dict[str, str]
    wrong_folder: str | None = None
    damages: tuple[str, ...] = DAMAGES


KINDS = {
    "mds": Kind({"index.json": "ckpt/step_2/meta.json", "shard.00000.mds": "ckpt/step_2/dense.safetensors",
                 "smft_data.json": "tok/tokenizer_config.json"},
                wrong_folder="tok"),
    "checkpoint": Kind({"latest": "qa.jsonl", "step_2/meta.json": "mds/index.json",
                        "step_2/manifest.json": "ckpt/step_2/meta.json",
                        "step_2/dense.safetensors": "bg/step_0/df/layer1.safetensors",
                        "step_2/memory/layer1.rows_0_256.safetensors": "ckpt/step_2/dense.safetensors",
                        "step_2/data.json": "ckpt/step_2/meta.json", "step_2/rng_rank0.pt": "ckpt/step_2/data.json"},
                       wrong_folder="mds"),
    "resume_state": Kind({"step_2/memory_optim/rows_0_256.safetensors": "ckpt/step_2/dense.safetensors",
                          "step_2/data.json": "ckpt/step_2/meta.json", "step_2/rng_rank0.pt": "ckpt/step_2/data.json",
                          "step_2/dense_optim.pt": "ckpt/step_2/rng_rank0.pt"}),
    "df": Kind({"layer1.safetensors": "ckpt/step_2/dense.safetensors"}, wrong_folder="tok"),
    "tokenizer": Kind({"tokenizer.json": "hf/config.json", "tokenizer_config.json": "qa.jsonl"}, wrong_folder="mds"),
    "hf_model": Kind({"config.json": "tok/tokenizer_config.json", "model.safetensors": "patch.smftpatch"},
                     wrong_folder="tok"),
    "dense_model": Kind({"config.json": "hf/config.json", "model.safetensors": "hf/model.safetensors"},
                        wrong_folder="tok"),
    "patch": Kind({"": "hf/model.safetensors"}),
    "ledger": Kind({"ledger.json": "hf/config.json", "rank0of1.records": "patch.smftpatch",
                    "rank0of1.index": "ckpt/step_2/data.json"}, wrong_folder="ckpt"),
    "df_step": Kind({"step_0/df/layer1.safetensors": "ckpt/step_2/dense.safetensors"}),
    "qa": Kind({"": "docs.jsonl"}),
    "docs": Kind({"": "hf/config.json"}),
    "paraphrases": Kind({"": "qa.jsonl"}),
    # A YAML mapping cut short is a shorter YAML mapping: any key may be missing from a valid config
    # (it takes its default), so a truncated run config cannot be told from a short one.
    "run_yaml": Kind({"": "tok/tokenizer.json"}, damages=("garbage", "empty", "wrong_kind")),
}

MEMORY_FLAGS = ["--n-keys", "16", "--heads", "2", "--knn", "4", "--k-dim", "16", "--value-dim", "32"]


def _train_argv(p, out, *extra):
    return ["--config", p["run_yaml"], f"out_dir={out}", *extra]


# command -> (main, {input slot: kind}, argv given {slot: path} and the output location)
COMMANDS = {
    "smft-data convert": (_data, {"docs": "docs", "tok": "tokenizer"},
                          lambda p, out: ["convert", p["docs"], "--tokenizer", p["tok"], "--out", out, "--seq-len", "64"]),
    "smft-data facts": (_data, {"qa": "qa", "paraphrases": "paraphrases"},
                        lambda p, out: ["facts", p["qa"], "--tokenizer", p["tok"], "--out", out, "--paraphrases", "2",
                                        "--paraphrases-file", p["paraphrases"]]),
    "smft-eval": (_eval, {"ckpt": "checkpoint", "qa": "qa", "mds": "mds", "tok": "tokenizer"},
                  lambda p, out: [p["ckpt"], "--qa", p["qa"], "--nll", p["mds"], "--nll-batches", "1",
                                  "--tokenizer", p["tok"], "--max-new-tokens", "2", "--json", f"{out}.json"]),
    "smft-eval hf": (_eval, {"hf": "hf_model"}, lambda p, out: [p["hf"], "--qa", p["qa"], "--max-new-tokens", "2",
                                                                 "--json", f"{out}.json"]),
    "smft-export": (_export, {"ckpt": "checkpoint", "tok": "tokenizer"},
                    lambda p, out: [p["ckpt"], "--out", out, "--tokenizer", p["tok"]]),
    "smft-retrofit": (_retrofit, {"dense": "dense_model", "tok": "tokenizer"},
                      lambda p, out: ["--model", p["dense"], "--out", out, "--layers", "1", "--tokenizer", p["tok"],
                                      *MEMORY_FLAGS]),
    "smft-patch apply": (_patch, {"patch": "patch", "hf": "hf_model"},
                         lambda p, out: ["apply", p["patch"], p["hf"], "--out", out]),
    "smft-patch apply checkpoint": (_patch, {"ckpt": "checkpoint"},
                                    lambda p, out: ["apply", p["patch"], p["ckpt"]]),
    "smft-patch merge": (_patch, {"patch": "patch"}, lambda p, out: ["merge", p["patch"], p["patch"], "--out", out]),
    "smft-patch export": (_patch, {"ledger": "ledger"}, lambda p, out: ["export", p["ledger"], "--out", out]),
    "smft-patch show": (_patch, {"patch": "patch", "bg": "df_step"},
                        lambda p, out: ["show", p["patch"], "--df", f"{p['bg']}/step_0", "--json", out]),
    "smft-inspect": (_inspect, {"run_yaml": "run_yaml"}, lambda p, out: ["--config", p["run_yaml"], "--plan"]),
    "train": (_train, {"run_yaml": "run_yaml", "mds": "mds"}, lambda p, out: _train_argv(p, out, f"data.train={p['mds']}")),
    "train init_from": (_train, {"ckpt": "checkpoint"},
                        lambda p, out: _train_argv(p, out, f"model.init_from={p['ckpt']}")),
    "train init_from hf": (_train, {"hf": "hf_model"}, lambda p, out: _train_argv(p, out, f"model.init_from={p['hf']}")),
    "train resume": (_train, {"ckpt": "resume_state"},
                     lambda p, out: _train_argv(p, out, f"checkpoint.resume={p['ckpt']}/step_2", "steps=3",
                                                 f"data.train={p['pretrain']}")),
    "train df_path": (_train, {"df": "df"},
                      lambda p, out: _train_argv(p, out, "mode=finetune", "method=sparse_memory",
                                                 f"model.init_from={p['ckpt']}", f"selection.df_path={p['df']}")),
    "train eval.qa": (_train, {"qa": "qa"},
                      lambda p, out: _train_argv(p, out, f"eval.qa=[{p['qa']}]", "eval.every=1",
                                                 "eval.max_new_tokens=2")),
    "train tokenizer": (_train, {"tok": "tokenizer"},
                        lambda p, out: _train_argv(p, out, f"model.tokenizer={p['tok']}", f"eval.qa=[{p['qa']}]",
                                                   "eval.every=1", "eval.max_new_tokens=2")),
}

# Out-of-range numbers: command -> (main, argv given the inputs and output, [(flag, bad values)]).
NUMBERS = {
    "smft-retrofit": (_retrofit, lambda p, out: ["--model", p["dense"], "--out", out, "--layers", "1", *MEMORY_FLAGS],
                      [("--layers", ["2", "-1", "0,0"]), ("--n-keys", ["0", "-4"]), ("--knn", ["0", "17"]),
                       ("--heads", ["0"]), ("--k-dim", ["0", "15"]), ("--value-dim", ["0"])]),
    "smft-data facts": (_data, lambda p, out: ["facts", p["qa"], "--tokenizer", p["tok"], "--out", out],
                        [("--seq-len", ["0", "-1"]), ("--paraphrases", ["0", "-2"]), ("--limit", ["0", "-1"])]),
    "smft-data convert": (_data, lambda p, out: ["convert", p["docs"], "--tokenizer", p["tok"], "--out", out],
                          [("--workers", ["0"]), ("--vocab-size", ["0", "-5"])]),
    "smft-data docs": (_data, lambda p, out: ["docs", p["docs"], "--tokenizer", p["tok"], "--out", out],
                       [("--chunk-tokens", ["0"]), ("--augmentations", ["0"])]),
    "smft-eval": (_eval, lambda p, out: [p["hf"], "--qa", p["qa"], "--nll", p["mds"], "--json", f"{out}.json"],
                  [("--batch-size", ["0"]), ("--max-new-tokens", ["0"]), ("--nll-batches", ["0"])]),
    "smft-patch show": (_patch, lambda p, out: ["show", p["patch"], "--json", out], [("--top", ["-1"])]),
    "smft-patch revert": (_patch, lambda p, out: ["revert", p["patch"], p["hf"], "--steps", "1", "--force", "--out", out],
                          [("--steps", ["9", "-1"]), ("--groups", ["99"])]),
    "smft-inspect": (_inspect, lambda p, out: ["--config", p["run_yaml"], "--plan"],
                     [("--mp", ["0"]), ("--world", ["0"]), ("--micro-batch", ["0"]), ("--seq-len", ["0"]),
                      ("--gpu-memory", ["0"])]),
}


@dataclass(frozen=True)
class Case:
    command: str
    slot: str  # the input damaged ("" for a number)
    file: str  # the file of it damaged ("" for a single-file input or a whole folder)
    damage: str  # one of DAMAGES, or "flag=value"


def _cases() -> list[Case]:
    out = []
    for command, (_, slots, _) in COMMANDS.items():
        for slot, kind in slots.items():
            for file in KINDS[kind].files:
                out += [Case(command, slot, file, d) for d in KINDS[kind].damages]
            if KINDS[kind].wrong_folder:
                out.append(Case(command, slot, "", "wrong_kind"))
    for command, (_, _, flags) in NUMBERS.items():
        out += [Case(command, "", "", f"{flag}={v}") for flag, values in flags for v in values]
    return out


CASES = _cases()


def _id(c: Case) -> str:
    return "-".join(x for x in (c.command.replace(" ", "_"), c.slot, c.file.replace("/", "."), c.damage) if x)


# ----- the inputs: one intact copy of each kind, made once per module -----
def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _small_run(config: str, out_dir: Path, data: Path, *overrides: str) -> None:
    """A small single-process run of configs/tiny/<config>.yaml, in-process (as test_bad_input's good_run)."""
    with pytest.MonkeyPatch.context() as mp:
        single_process_env(mp)
        args = config_args(config, out_dir, data, *overrides)
        assert _train([args[0], str(ROOT / args[1]), *args[2:]]) == 0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder holding one intact input of each kind, named as COMMANDS' slots name them: a small
    synthetic dataset, a 2-step pretraining run's checkpoints and a background df index built from
    them (all written in-process, in seconds), their export, a dense Llama, a patch and a ledger."""
    from transformers import LlamaForCausalLM

    from smft_dist.config import load_config, save_config
    from smft_dist.patch.ledger import Ledger, RowUpdate, StepRecord
    from smft_dist.patch.patch import Patch
    from smft_dist.train.export import main as export_main
    from tests.test_retrofit import small_llama

    root = tmp_path_factory.mktemp("damage_inputs")
    rel_data, good_run = root / "syn", root / "good_run"
    assert _data(["synthetic", "--out", str(rel_data), "--n-known", "30", "--n-new", "10", "--seq-len", "32",
                  "--pretrain-docs", "600", "--background-docs", "200", "--heldout-docs", "50"]) == 0
    _small_run("pretrain", good_run, rel_data, "steps=2")
    _small_run("background_index", good_run / "bg", rel_data, f"model.init_from={good_run}/checkpoints",
               "selection.background_batches=2")
    shutil.copytree(rel_data / "tokenizer", root / "tok")
    shutil.copytree(rel_data / "heldout", root / "mds")
    shutil.copytree(rel_data / "pretrain", root / "pretrain")  # what good_run trained on (resumes read it)
    shutil.copytree(good_run / "checkpoints", root / "ckpt")
    shutil.copytree(good_run / "bg" / "checkpoints", root / "bg")
    shutil.copytree(root / "bg" / "step_0" / "df", root / "df")
    qa = [json.loads(line) for line in (rel_data / "eval" / "new_qa.jsonl").read_text().splitlines()[:3]]
    _write_jsonl(root / "qa.jsonl", qa)
    _write_jsonl(root / "docs.jsonl", [{"id": f"d{i}", "text": q["question"] + " " + q["answer"]}
                                       for i, q in enumerate(qa)])
    _write_jsonl(root / "paraphrases.jsonl", [{"id": q["id"], "paraphrases": [q["question"], q["answer"]]}
                                              for q in qa])
    assert export_main([str(root / "ckpt"), "--out", str(root / "hf"), "--tokenizer", str(root / "tok")]) == 0
    torch.manual_seed(0)
    LlamaForCausalLM(small_llama(num_hidden_layers=2)).save_pretrained(root / "dense")
    for f in (root / "tok").iterdir():
        shutil.copy(f, root / "dense" / f.name)
    cfg = load_config(ROOT / "configs/tiny/pretrain.yaml",
                      [*SMALL, f"data.train={root / 'mds'}", "steps=1", "checkpoint.every=0"])
    save_config(cfg, root / "run_yaml")

    # a patch of two rows of the exported model, made on it (its base rows are the model's), and a
    # one-step ledger of the same update
    from safetensors.torch import load_file

    weights = load_file(str(root / "hf" / "model.safetensors"))
    values_RD = next(v for k, v in weights.items() if k.startswith("model.layers.1.") and k.endswith("values.weight"))
    ids_U = torch.tensor([3, 7])
    update = RowUpdate(ids_U, values_RD[ids_U], values_RD[ids_U] + 1)
    meta = {"model": json.loads((root / "hf" / "config.json").read_text()), "layers": ["layer1"],
            "num_rows": values_RD.shape[0], "dim": values_RD.shape[1], "dtype": str(values_RD.dtype)}
    Patch(meta, [StepRecord(1, [0], ["0" * 64], {"layer1": update})]).save(root / "patch.smftpatch")
    ledger = Ledger.open(root / "ledger", rank=0, world_size=1, names=["layer1"], meta=meta)
    ledger.append(1, {"layer1.ids": ids_U, "layer1.before": update.before, "layer1.after": update.after},
                  {"step": "1", "groups": "[0]", "batch_sha256": "0" * 64})
    ledger.close()
    return root


def _paths(inputs: Path, case_dir: Path, slots: dict[str, str]) -> dict[str, str]:
    """Every input's path: the slots of the command copied into `case_dir` (there they may be
    damaged), the others read from the intact `inputs`."""
    p = {f.name.split(".")[0] if f.is_file() else f.name: str(f) for f in inputs.iterdir()}
    for slot in slots:
        src = Path(p[slot])
        dst = case_dir / "in" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        p[slot] = str(dst)
    return p


def _damage(target: Path, how: str, wrong: Path) -> None:
    data = target.read_bytes()
    if how == "truncated":  # inside a line: a text file cut at a line's end is a shorter intact file
        cut = len(data) // 2
        while cut > 1 and data[cut - 1:cut] == b"\n":
            cut -= 1
        target.write_bytes(data[:cut])
    elif how == "garbage":  # same length, seeded: every run damages the same way
        target.write_bytes(random.Random(target.name).randbytes(max(len(data), 64)))
    elif how == "empty":
        target.write_bytes(b"")
    else:
        shutil.copyfile(wrong, target)


def _snapshot(root: Path) -> dict[str, str | None]:
    """Every file (-> its sha256) and folder (-> None) under `root`: an empty folder left behind counts."""
    return {**{str(d.relative_to(root)): None for d in root.rglob("*") if d.is_dir()}, **tree_digest(root)}


ERROR_LINE = re.compile(r"^(\S+: )?error: ")  # argparse's usage errors are "prog: error: ..."


def _run(main, argv, capsys) -> tuple[int | None, str]:
    """(exit code, stderr) of `main(argv)`; an exception escaping it is a traceback the user sees."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception:  # noqa: BLE001 (the case fails below, showing it)
        return None, capsys.readouterr().err + traceback.format_exc()
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_damaged_input_ends_in_one_error_line(case, inputs, tmp_path, capsys, monkeypatch):
    single_process_env(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if case.slot:
        main, slots, argv_of = COMMANDS[case.command]
        kind = KINDS[slots[case.slot]]
    else:
        main, argv_of, _ = NUMBERS[case.command]
        slots = {}
    paths = _paths(inputs, tmp_path, slots)
    named = ()  # what the error line must name (one of)
    if case.slot and case.file:
        target = Path(paths[case.slot]) / case.file
        _damage(target, case.damage, inputs / kind.files[case.file])
        named = (target.name, paths[case.slot])
    elif case.slot and kind.files.get(""):
        target = Path(paths[case.slot])
        _damage(target, case.damage, inputs / kind.files[""])
        named = (paths[case.slot],)
    elif case.slot:  # a whole folder of another kind
        shutil.rmtree(paths[case.slot])
        shutil.copytree(inputs / kind.wrong_folder, paths[case.slot])
        named = (paths[case.slot],)
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / "result")
    argv = argv_of(paths, out)
    if not case.slot:
        flag, value = case.damage.split("=", 1)
        argv = [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)] + [flag, value]
        named = (flag, flag.lstrip("-").replace("-", "_"))
    before = _snapshot(tmp_path)
    rc, err = _run(main, argv, capsys)
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    last = err.strip().splitlines()[-1:] or [""]
    assert rc == 2 and errors == last and "Traceback" not in err, f"exit {rc}: {last[0]}\n{err[-4000:]}"
    assert any(name in errors[0] for name in named), f"the error names none of {named}: {errors[0]}"
    assert _snapshot(tmp_path) == before, "the command wrote, changed or left files or folders"


@pytest.mark.parametrize("command", [*(f"{c} (files)" for c in COMMANDS), *(f"{c} (numbers)" for c in NUMBERS)])
def test_intact_inputs_succeed(command, inputs, tmp_path, capsys, monkeypatch):
    """Each command line of the tables runs clean on intact inputs: every refusal above is the damage's."""
    single_process_env(monkeypatch)
    name, table = command.rsplit(" ", 1)
    main, _, argv_of = COMMANDS[name] if table == "(files)" else (NUMBERS[name][0], None, NUMBERS[name][1])
    (tmp_path / "out").mkdir()
    rc, err = _run(main, argv_of(_paths(inputs, tmp_path, {}), str(tmp_path / "out" / "result")), capsys)
    assert rc == 0, err[-4000:]


def test_a_message_of_several_lines_is_one_error_line(tmp_path, capsys):
    """A YAML syntax error's message spans lines (the parser's "while parsing ... line 2, column 7"):
    `console_script` prints it as the one `error:` line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    rc, err = _run(_inspect, ["--config", str(bad)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {bad}: not valid YAML: while parsing a flow "), err


def test_the_docs_state_the_table_size():
    """docs/reliability.md and the README give the table's size: the count generated here."""
    for page in ("docs/reliability.md", "README.md"):
        text = (ROOT / page).read_text()
        assert f"{len(CASES)} cases, and all {len(CASES)}" in text, f"{page} should state the damaged-input table's {len(CASES)} cases"
