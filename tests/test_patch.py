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
from tests.conftest import PY, checkpoint_tensors, data_overrides, latest_dir, ledger_killed_at, run_cli

N_FACTS = 10
PER_FACT = 16  # 12 paraphrases + 4 copies of the QA pair = one batch: one step per fact


def write_fact_batches(data, out) -> list[dict]:
    """MDS with one batch of PER_FACT samples per new fact (column group = fact id), in fact
    order, with the tiny benchmark's tokenizer; -> the N_FACTS batches written, collated as the
    trainer reads them (input_ids, attention_mask, labels: PER_FACT x 32; group: PER_FACT)."""
    from transformers import AutoTokenizer

    from smft_dist.data.loader import collate
    from smft_dist.data.mds import Encoder, WriteStats, example_samples, write_mds
    from smft_dist.data.synthetic import SyntheticWorld
    from smft_dist.io import atomic_dir

    world = SyntheticWorld(seed=1, n_known=6, n_new=N_FACTS, paraphrases=12, pretrain_docs=10, background_docs=1,
                           heldout_docs=1)
    groups = []
    for i, (statements, qa) in enumerate(zip(world.new_fact_statements(), world.new_qa())):
        records = [{"where": f"fact {i}", "text": s, "group": i} for s in statements]
        records += [{"where": f"fact {i} QA", "prompt": qa["prompt"], "completion": qa["answer"], "group": i}] * (
            PER_FACT - len(statements))
        groups.append(records)
    enc = Encoder(AutoTokenizer.from_pretrained(str(data / "tokenizer")), 32)
    samples = list(example_samples(enc, groups, WriteStats()))
    with atomic_dir(out) as tmp:
        write_mds(tmp, samples, grouped=True)
    return [collate(samples[i * PER_FACT:(i + 1) * PER_FACT]) for i in range(N_FACTS)]


def finetune_args(data, facts, base, out, *extra):
    # memory_lr 3e4 under the mean loss (memory_lr_scale=mean; docs/design.md §5.2 relates it to a
    # per-token lr): fact 4's step lowers its own batch's loss by 0.17, 3.9x any other fact's change;
    # at 3e3 by 0.017, at 1e5 by less than it moves another fact's (test_learn_ten_facts_and_revert_fact_k)
    return ["--config", "configs/tiny/finetune_sparse.yaml", *data_overrides(data), f"data.train={facts}",
            f"model.init_from={base}", f"out_dir={out}", f"data.batch_size={PER_FACT}", f"steps={N_FACTS}",
            "checkpoint.every=0", "selection.top_t=50", "optim.memory_lr=30000", "optim.memory_lr_scale=mean", *extra]


@pytest.fixture(scope="module")
def learned(tiny_data, patch_base_model, tmp_path_factory):
    """-> (run dir, the facts' batches): the 10 facts learned one step each from `patch_base_model`."""
    root = tmp_path_factory.mktemp("patch")
    batches = write_fact_batches(tiny_data, root / "facts")
    run_cli([PY, "launchers/train.py", *finetune_args(tiny_data, root / "facts", patch_base_model, root / "run")])
    return root / "run", batches


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


def batch_losses(model, batches) -> list[float]:
    """Each batch's loss as the finetune step took it: the mean NLL of its label tokens."""
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.item()
                for b in batches]


def change_of(k, before, after) -> tuple[float, float]:
    """-> (fact k's loss change after - before, the largest |change| of any other fact's loss)."""
    return after[k] - before[k], max(abs(a - b) for j, (b, a) in enumerate(zip(before, after)) if j != k)


# What this test claims, for fact k = 4 (learned by step k + 1):
# 1. the full run's revert of fact k (command line): the rows only fact k wrote return to their
#    base bitwise, the rows it shares only with earlier facts to their value before step k + 1,
#    no other row moves, and the overlaps reported are exactly the rows later facts also wrote;
# 2. step-local, exactly: on the model that learned facts 0..k-1 (base + steps 1..k), fact k's step
#    lowers the loss of fact k's own batch (the batch the ledger hashed) more than twice as much as
#    it moves any other fact's; reverting that step of the patch of facts 0..k returns the memory
#    to the model before it bitwise, and so every fact's loss to exactly its value before;
# 3. at the end of the stream: the full run's revert of fact k raises fact k's batch loss more
#    than twice as much as it moves any other fact's.
# "Twice": a step that only shifts every loss alike (as the answer pattern below) moves each fact's
# loss about as much as fact k's (ratio ~1); learning fact k is a change of its own loss well above
# the others'. Measured here (2-core CPU, memory_lr 3e4, top_t 50): 2. fact 4's batch loss 4.618 ->
# 4.445 (-0.174), the other facts' largest |change| 0.045: 3.9x (0.084 nats above the 2x bar);
# reverted: 4.618 exactly. 3. the revert raises fact 4's loss 4.441 -> 4.579 (+0.138), the others'
# largest |change| 0.043: 3.2x (0.052 nats above the bar). (k = 4 was this test's fact before; over
# k = 0..9 the step-local ratio spans 0.7 (k = 3) to 8.4: not every fact's step is this specific.)
# The test used to claim that the finetune lowers fact k's ANSWER NLL (its QA prompt -> answer) by
# 0.1 and the revert raises it back. At this scale one step stores no answer of its own: fact 4's
# answer NLL falls 0.04 over the 10 steps (8.02 -> 7.98) and 0.003 in its own step; with
# memory_lr 3e2..1e6 the fall stays within -0.02..0.04 (three passes over the facts: 0.03); with
# top_t 100-500 one step writes a general answer pattern that lowers every fact's answer by 2.1-2.5
# and reverting fact 4 moves its answer NLL by 0.00 (later steps rewrote those rows). Each step
# lowers its batch's loss through the statements (12 of its 16 records), not the QA answer.
def test_learn_ten_facts_and_revert_fact_k(learned, patch_base_model, tmp_path):
    from smft_dist.patch.apply import live_target
    from smft_dist.patch.ledger import batch_identity
    from smft_dist.checkpoint.model import load_checkpoint_model

    run, batches = learned
    k = 4
    patch = export_patch(run)
    assert [batch_identity(b) for b in batches] == [(s.groups, s.batch_sha256[0]) for s in patch.steps]
    # 1. the full run's revert of fact k, through the command line
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

    # 2. step-local, on a live model: base + steps 1..k, then fact k's step, then its revert
    model = load_checkpoint_model(patch_base_model)[0].eval()
    table = model.memory_layers()[0].values.weight
    apply_patch(patch.select(steps=range(1, k + 1)), live_target(model))
    before, before_rows = batch_losses(model, batches), table.detach().clone()
    apply_patch(patch.select(steps=[k + 1]), live_target(model))
    after = batch_losses(model, batches)
    report = revert_steps(patch.select(steps=range(1, k + 2)), live_target(model), step_k)
    assert report.overlaps == [] and report.restored == {"layer2": len(rows_k)}
    assert torch.equal(table, before_rows) and batch_losses(model, batches) == before
    learned_k, others = change_of(k, before, after)
    print(f"step {k + 1}: fact {k}'s batch loss {before[k]:.3f} -> {after[k]:.3f}, others' largest change {others:.3f}")
    assert -learned_k > 2 * others, (before, after)
    # 3. the end of the stream: the checkpoint the command line reverted
    end = {name: batch_losses(load_checkpoint_model(path)[0].eval(), batches)
           for name, path in (("learned", run / "checkpoints"), ("reverted", tmp_path / "reverted"))}
    unlearned_k, others = change_of(k, end["learned"], end["reverted"])
    print(f"revert of fact {k}: its batch loss {end['learned'][k]:.3f} -> {end['reverted'][k]:.3f}, "
          f"others' largest change {others:.3f}")
    assert unlearned_k > 2 * others, end


def test_a_killed_run_leaves_a_ledger_that_exports_its_complete_steps_and_resume_continues_it(
        learned, patch_base_model, tiny_data, tmp_path):
    facts = learned[0].parent / "facts"
    args = finetune_args(tiny_data, facts, patch_base_model, tmp_path / "run", "steps=6", "checkpoint.every=2")
    r = run_cli([PY, "-c", ledger_killed_at(4), *args], check=False)
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
    ranks = [Ledger.open(tmp_path, rank=r, world_size=2, names=["m"], meta=meta) for r in (0, 1)]
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
