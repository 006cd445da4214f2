"""Knowledge patches: the ledger of a real sparse-memory finetune (10 facts, one step each),
exported, applied, refused, reverted, and a ledger that survives a SIGKILL mid-step."""
import json
import shutil
import struct

import pytest
import torch

from smft_dist.patch.apply import PatchMismatch, apply_patch, open_target, revert_steps, steps_of
from smft_dist.patch.ledger import Ledger, complete_steps, read_step
from smft_dist.patch.patch import Patch, export_patch, merge_patches
from tests.conftest import PY, checkpoint_tensors, data_overrides, latest_dir, run_cli

N_FACTS = 10
PER_FACT = 16  # 12 paraphrases + 4 copies of the QA pair = one batch: one step per fact


def write_fact_batches(data, out) -> list[dict]:
    """MDS with one batch of PER_FACT samples per new fact (column group = fact id), in fact
    order, with the tiny benchmark's tokenizer; -> the facts' QA pairs."""
    from transformers import AutoTokenizer

    from smft_dist.data.mds import Encoder, WriteStats, atomic_dir, example_samples, write_mds
    from smft_dist.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=1, n_known=6, n_new=N_FACTS, paraphrases=12, pretrain_docs=10, background_docs=1,
                           heldout_docs=1)
    groups = []
    for i, (statements, qa) in enumerate(zip(world.new_fact_statements(), world.new_qa())):
        records = [{"where": f"fact {i}", "text": s, "group": i} for s in statements]
        records += [{"where": f"fact {i} QA", "prompt": qa["prompt"], "completion": qa["answer"], "group": i}] * (
            PER_FACT - len(statements))
        groups.append(records)
    enc = Encoder(AutoTokenizer.from_pretrained(str(data / "tokenizer")), 32)
    with atomic_dir(out) as tmp:
        write_mds(tmp, example_samples(enc, groups, WriteStats()), grouped=True)
    return world.new_qa()


def finetune_args(data, facts, base, out, *extra):
    # memory_lr 3e4 under the mean loss (docs/design.md §5.2 relates it to a per-token lr): at this
    # scale a smaller step barely moves an answer
    return ["--config", "configs/tiny/finetune_sparse.yaml", *data_overrides(data), f"data.train={facts}",
            f"model.init_from={base}", f"out_dir={out}", f"data.batch_size={PER_FACT}", f"steps={N_FACTS}",
            "checkpoint.every=0", "selection.top_t=50", "optim.memory_lr=30000", *extra]


@pytest.fixture(scope="module")
def learned(tiny_data, patch_base_model, tmp_path_factory):
    """-> (run dir, QA pairs): the 10 facts learned one step each from `patch_base_model`."""
    root = tmp_path_factory.mktemp("patch")
    qa = write_fact_batches(tiny_data, root / "facts")
    run_cli([PY, "launchers/train.py", *finetune_args(tiny_data, root / "facts", patch_base_model, root / "run")])
    return root / "run", qa


def memory(step_dir):
    return checkpoint_tensors(step_dir)["memory"]


def test_ledger_records_each_step_with_its_fact(learned):
    run, _ = learned
    patch = export_patch(run)
    assert [s.step for s in patch.steps] == list(range(1, N_FACTS + 1))
    assert [s.groups for s in patch.steps] == [[i] for i in range(N_FACTS)]  # step i+1 learned fact i
    assert all(0 < s.layers["layer2"].ids.numel() <= 50 for s in patch.steps)
    assert len({s.batch_sha256[0] for s in patch.steps}) == N_FACTS
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s.layers["layer2"].ids.numel() for s in patch.steps] == [m["rows_updated"] for m in steps]


def test_patch_applied_to_the_base_reproduces_the_finetuned_memory_bitwise(learned, patch_base_model, tiny_data,
                                                                            tmp_path):
    run, _ = learned
    r = run_cli([PY, "-m", "smft_dist.patch.cli", "export", str(run), "--out", str(tmp_path / "all.smftpatch")])
    assert "10 steps" in r.stdout
    patch = Patch.load(tmp_path / "all.smftpatch")
    assert patch.base_sha256 == export_patch(run).base_sha256
    want = memory(latest_dir(run / "checkpoints"))
    assert not torch.equal(want, memory(latest_dir(patch_base_model)))
    # a checkpoint copy, through the command line
    run_cli([PY, "-m", "smft_dist.patch.cli", "apply", str(tmp_path / "all.smftpatch"), str(patch_base_model),
             "--out", str(tmp_path / "ckpt")])
    assert torch.equal(memory(latest_dir(tmp_path / "ckpt")), want)
    # an exported HF folder, through the API
    run_cli([PY, "-m", "smft_dist.train.export", str(patch_base_model), "--out", str(tmp_path / "hf")])
    apply_patch(patch, open_target(tmp_path / "hf", writable=True))
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["model.layers.2.mlp.values.weight"], want)


def test_wrong_base_is_refused_naming_the_rows(learned, patch_base_model, tmp_path):
    run, _ = learned
    patch = export_patch(run)
    shutil.copytree(patch_base_model, tmp_path / "base")
    step_dir = latest_dir(tmp_path / "base")
    row = int(patch.steps[3].layers["layer2"].ids[7])
    target = open_target(step_dir, writable=True)
    target.write("layer2", torch.tensor([row]), target.read("layer2", torch.tensor([row])) + 1.0)
    target.flush()
    before = memory(step_dir)
    with pytest.raises(PatchMismatch, match=rf"layer2 rows \[{row}\] \(1 rows\)"):
        apply_patch(patch, open_target(step_dir, writable=True))
    assert torch.equal(memory(step_dir), before)  # nothing written
    patch.save(tmp_path / "p.smftpatch")
    r = run_cli([PY, "-m", "smft_dist.patch.cli", "apply", str(tmp_path / "p.smftpatch"), str(step_dir)], check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and f"rows [{row}]" in r.stderr
    report = apply_patch(patch, open_target(step_dir, writable=True), force=True)
    assert report.forced == {"layer2": [row]}
    got, want = memory(step_dir), memory(latest_dir(run / "checkpoints"))
    others = torch.arange(got.shape[0]) != row
    assert torch.equal(got[others], want[others])  # every other row exactly; the forced row: base + 1 + delta
    torch.testing.assert_close(got[row], want[row] + 1.0)
    # reverting every step: refused on that row too, unless forced; then every other row is its base exactly
    every = [s.step for s in patch.steps]
    with pytest.raises(PatchMismatch, match=rf"layer2 rows \[{row}\] \(1 rows\) do not hold the patch's result"):
        revert_steps(patch, open_target(step_dir, writable=True), every)
    report = revert_steps(patch, open_target(step_dir, writable=True), every, force=True)
    assert report.forced == {"layer2": [row]} and report.overlaps == []
    base = memory(latest_dir(patch_base_model))
    assert torch.equal(memory(step_dir)[others], base[others])
    torch.testing.assert_close(memory(step_dir)[row], base[row] + 1.0)


def answer_nll(model, tok, qa_pairs) -> list[float]:
    """Teacher-forced NLL of each answer after its QA prompt."""
    out = []
    with torch.no_grad():
        for qa in qa_pairs:
            prompt = tok(qa["prompt"], add_special_tokens=False)["input_ids"]
            answer = tok(" " + qa["answer"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tok.bos_token_id] + prompt + answer])
            labels = torch.full_like(ids, -100)
            labels[0, -len(answer):] = ids[0, -len(answer):]
            out.append(model(input_ids=ids, labels=labels).loss.item())
    return out


def test_learn_ten_facts_and_revert_fact_k(learned, patch_base_model, tiny_data, tmp_path):
    from transformers import AutoTokenizer

    from smft_dist.eval.qa import evaluate_qa
    from smft_dist.train.export import load_checkpoint_model

    run, qa = learned
    k = 4
    patch = export_patch(run)
    patch.save(tmp_path / "all.smftpatch")
    r = run_cli([PY, "-m", "smft_dist.patch.cli", "revert", str(tmp_path / "all.smftpatch"), str(run / "checkpoints"),
                 "--groups", str(k), "--out", str(tmp_path / "reverted")])
    print(r.stdout)
    step_k = steps_of(patch, groups=[k])
    assert step_k == [k + 1] and f"reverted steps [{k + 1}]" in r.stdout

    base, learned_mem = memory(latest_dir(patch_base_model)), memory(latest_dir(run / "checkpoints"))
    reverted = memory(latest_dir(tmp_path / "reverted"))
    rows_k = set(patch.steps[k].layers["layer2"].ids.tolist())
    earlier = set().union(*(set(s.layers["layer2"].ids.tolist()) for s in patch.steps[:k]))
    later = set().union(*(set(s.layers["layer2"].ids.tolist()) for s in patch.steps[k + 1:]))
    only_k = sorted(rows_k - earlier - later)
    assert only_k, "fact k wrote no row of its own: the test shows nothing"
    assert torch.equal(reverted[only_k], base[only_k])  # rows only fact k wrote: bitwise their base values
    before_k = patch.steps[k].layers["layer2"]
    no_later = sorted(rows_k - later)  # rows k shares only with earlier facts: their value before step k, exactly
    assert torch.equal(reverted[no_later], before_k.before[torch.isin(before_k.ids, torch.tensor(no_later))])
    untouched = torch.ones(base.shape[0], dtype=torch.bool)
    untouched[sorted(rows_k)] = False
    assert torch.equal(reverted[untouched], learned_mem[untouched])  # nothing else moved
    # the overlaps reported are exactly the rows fact k shares with later facts (API on a second copy)
    shutil.copytree(run / "checkpoints", tmp_path / "again")
    report = revert_steps(patch, open_target(tmp_path / "again", writable=True), step_k)
    shared_later = sorted(rows_k & later)
    assert sorted(o["row"] for o in report.overlaps) == shared_later
    assert report.restored == {"layer2": len(rows_k) - len(shared_later)}
    assert all(set(o["later_groups"]) <= set(range(k + 1, N_FACTS)) for o in report.overlaps)
    assert torch.equal(memory(latest_dir(tmp_path / "again")), reverted)
    assert ("overlap:" in r.stdout) == bool(shared_later)

    tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    models = {name: load_checkpoint_model(p)[0].eval() for name, p in
              (("base", patch_base_model), ("learned", run / "checkpoints"), ("reverted", tmp_path / "reverted"))}
    nll = {name: answer_nll(m, tok, qa) for name, m in models.items()}
    f1 = {name: [p["f1"] for p in sorted(evaluate_qa(m, tok, qa, max_new_tokens=3)["predictions"],
                                         key=lambda p: p["index"])] for name, m in models.items()}
    print({name: [round(x, 2) for x in v] for name, v in nll.items()}, f1)
    assert nll["learned"][k] < nll["base"][k] - 0.1  # the finetune learned fact k's answer ...
    assert nll["reverted"][k] > nll["learned"][k] + 0.1  # ... and the revert takes it back out
    if shared_later:
        print(f"fact {k}: {len(shared_later)} rows shared with later facts keep part of it: {shared_later}")
    else:
        assert f1["reverted"][k] == f1["base"][k]
    for j in range(N_FACTS):  # the other facts' answers stay, unless they share rows with fact k
        rows_j = set().union(*(set(s.layers["layer2"].ids.tolist()) for s in patch.steps if j in s.groups))
        if j != k and abs(nll["reverted"][j] - nll["learned"][j]) > 0.02:
            assert rows_j & rows_k, (j, nll["reverted"][j], nll["learned"][j])
            print(f"fact {j} shares rows {sorted(rows_j & rows_k)} with fact {k}: its answer moved")


KILL_AT_STEP_4 = """
import os, signal, sys
from safetensors.torch import save
from smft_dist.patch.ledger import Ledger
append = Ledger.append
def dying_append(self, step, tensors, metadata):
    if step == 4:  # half of step 4's record reaches the file, then the process is killed before its index entry
        blob = save(tensors, metadata=metadata)
        self._records.write(blob[:len(blob) // 2])
        self._records.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, step, tensors, metadata)
Ledger.append = dying_append
from smft_dist.train.loop import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_leaves_a_ledger_that_exports_its_complete_steps_and_resume_continues_it(
        learned, patch_base_model, tiny_data, tmp_path):
    facts = learned[0].parent / "facts"
    args = finetune_args(tiny_data, facts, patch_base_model, tmp_path / "run", "steps=6", "checkpoint.every=2")
    r = run_cli([PY, "-c", KILL_AT_STEP_4, *args], check=False)
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL
    patch = export_patch(tmp_path / "run")
    assert [s.step for s in patch.steps] == [1, 2, 3]  # the last complete step; step 4's half record is ignored
    run_cli([PY, "launchers/train.py", *args])  # resumes from the step-2 checkpoint: the ledger is cut there
    patch = export_patch(tmp_path / "run")
    assert [s.step for s in patch.steps] == [1, 2, 3, 4, 5, 6]  # steps 3-4 recorded again, once
    shutil.copytree(patch_base_model, tmp_path / "base")
    apply_patch(patch, open_target(tmp_path / "base", writable=True))
    assert torch.equal(memory(latest_dir(tmp_path / "base")), memory(latest_dir(tmp_path / "run" / "checkpoints")))


def _write_steps(ledger: Ledger, steps, rows_of):
    for step in steps:
        ids = torch.tensor(rows_of(step))
        ledger.append(step, {"m.ids": ids, "m.before": torch.zeros(len(ids), 2), "m.after": torch.ones(len(ids), 2)},
                      {"step": str(step), "groups": json.dumps([step]), "batch_sha256": f"h{step}"})


def test_a_step_is_complete_only_when_every_rank_recorded_it(tmp_path):
    """Two ranks' files: rank 1 died before step 3; a torn index entry is ignored; reopening at
    step 1 (a resume) cuts both ranks' files there."""
    meta = {"layers": ["m"], "num_rows": 8, "dim": 2}
    ranks = [Ledger.open(tmp_path, rank=r, world_size=2, names=["m"], meta=meta, fsync=False) for r in (0, 1)]
    _write_steps(ranks[0], [1, 2, 3], lambda s: [s - 1])  # rank 0 owns rows 0-3
    _write_steps(ranks[1], [1, 2], lambda s: [4 + s])
    ranks[1]._index.write(b"\x01\x02\x03")  # a torn entry
    ranks[1]._index.flush()
    for w in ranks:
        w.close()
    found = complete_steps(tmp_path)
    assert list(found) == [1, 2]
    step2 = read_step(2, found[2], ["m"])
    assert step2.layers["m"].ids.tolist() == [1, 6] and step2.groups == [2] and step2.batch_sha256 == ["h2", "h2"]
    Ledger.open(tmp_path, rank=0, world_size=2, names=["m"], meta=meta, step=1).close()
    Ledger.open(tmp_path, rank=1, world_size=2, names=["m"], meta=meta, step=1).close()
    assert list(complete_steps(tmp_path)) == [1]
    assert (tmp_path / "rank1of2.index").stat().st_size == struct.calcsize("<qQQI")


def test_show_lists_rows_per_group_shared_rows_and_plots(learned, tmp_path):
    run, _ = learned
    r = run_cli([PY, "-m", "smft_dist.patch.cli", "show", str(run), "--df", str(latest_dir(run / "checkpoints")),
                 "--png", str(tmp_path / "rows.png"), "--json", str(tmp_path / "audit.json"), "--top", "3"])
    report = json.loads((tmp_path / "audit.json").read_text())
    patch = export_patch(run)
    rows = {g: set(patch.touched("layer2", [s for s in patch.steps if g in s.groups]).tolist()) for g in range(N_FACTS)}
    shared = {tuple(o["groups"]): o["rows"] for o in report["shared"]}
    assert shared == {(a, b): sorted(rows[a] & rows[b]) for a in range(N_FACTS) for b in range(a + 1, N_FACTS)
                      if rows[a] & rows[b]}
    top = report["most_written"][0]
    assert top["steps"] == max(sum(top_row in rows[g] for g in rows) for top_row in set().union(*rows.values()))
    assert report["df_batches"] == 10 and top["df"] is not None and "most-written rows" in r.stdout
    assert (tmp_path / "rows.png").read_bytes().startswith(b"\x89PNG")


def test_merge_reports_rows_both_patches_write(learned):
    patch = export_patch(learned[0])
    a, b = patch.select(steps=[1, 2]), patch.select(steps=[3])
    merged, report = merge_patches([b, a])
    assert [s.step for s in merged.steps] == [1, 2, 3] and not report.renumbered
    shared = sorted(set(a.touched("layer2").tolist()) & set(b.touched("layer2").tolist()))
    assert [r for r, _ in report.conflicts["layer2"]] == shared
    assert merged.result_sha256 == patch.select(steps=[1, 2, 3]).result_sha256
