"""selection.top_t=auto: per step, the fewest top-ranked rows whose scores hold `auto_mass` of the
step's score mass, at most `top_t_max` (single process; tests/dist/test_top_t_auto_dist.py runs it
over gloo ranks)."""
import math
from fractions import Fraction

import pytest
import torch

from smft_dist.config import ConfigError, load_config
from smft_dist.model.memory_plan import memory_plan
from smft_dist.selection import select_top_t
from tests.conftest import PY, ROOT, data_overrides, run_cli
from tests.test_selection import counted_table, index_for

SPARSE = ROOT / "configs" / "tiny" / "finetune_sparse.yaml"


def reference_auto(ids: list[int], counts: list[int], idf: dict[int, float], share: float, t_max: int) -> list[int]:
    """The definition, in exact rationals (of the float idf and share): rank rows by (-score, slot),
    score c/sum(c) x idf (1 without df: tf); keep the shortest prefix (at least one row) whose score
    sum is >= share x every row's score sum, at most t_max rows."""
    total = sum(counts)
    scored = sorted((-Fraction(c, total) * Fraction(idf.get(i, 1.0)), i) for i, c in zip(ids, counts))
    need = Fraction(share) * sum(-s for s, _ in scored)
    prefix, t = Fraction(0), 0
    while t < min(t_max, len(scored)) and (t == 0 or prefix < need):
        prefix, t = prefix - scored[t][0], t + 1
    return sorted(i for _, i in scored[:t])


@pytest.mark.parametrize("name, counts, share, t_max, want_t", [
    ("peaked", [50, 40] + [1] * 30, 0.5, 100, 2),  # 50 of 120 < 60 <= 90: two rows
    ("peaked, most of the mass", [50, 40] + [1] * 30, 0.88, 100, 18),  # 105.6 of 120: 90 + 16 ones
    ("flat", [2] * 40, 0.5, 100, 20),  # exactly half at 20 rows (integer mass: no rounding at the edge)
    ("flat, capped", [2] * 40, 0.5, 8, 8),
    ("flat, all of it", [2] * 40, 1.0, 100, 40),
])
def test_tf_auto_t_is_the_smallest_holding_the_share(name, counts, share, t_max, want_t):
    # slots scattered so that ties (flat) must go to the lowest slots, not to the recording order
    ids = [(7 * k + 3) % 101 for k in range(len(counts))]
    table = counted_table(101, ids, counts)
    got, stats = select_top_t(table, None, t_max, "tf", auto_mass=share)
    want = reference_auto(ids, counts, {}, share, t_max)
    assert len(want) == want_t and got.tolist() == want, name
    assert stats.selected == want_t and int(stats.candidates) == len(counts)
    assert int(stats.selected_accesses) == sum(c for i, c in zip(ids, counts) if i in want)


def test_tfidf_auto_t_weighs_by_idf():
    """Row 1 is read most but sits in every background batch (idf 0): it holds no mass, so the
    share is met by rows 2 and 3 alone, and row 1 is not selected (under tf it would be first)."""
    ids, counts = [1, 2, 3, 4, 5, 6], [20, 6, 5, 1, 1, 1]
    table = counted_table(10, ids, counts)
    df = {1: 8, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0}
    index = index_for(table, df, 8)
    got, stats = select_top_t(table, index, 6, "tfidf", auto_mass=0.6)
    # mass (x sum c x 1/log 9): 0, 6, 5, 1, 1, 1 -> 14; 0.6 x 14 = 8.4 <= 6 + 5
    assert got.tolist() == [2, 3] and stats.selected == 2
    idf = {i: math.log(9 / (d + 1)) for i, d in df.items()}
    assert got.tolist() == reference_auto(ids, counts, idf, 0.6, 6)
    assert select_top_t(table, index, 6, "tf", auto_mass=0.6)[0].tolist() == [1, 2]  # 20 + 6 of 34


@pytest.mark.parametrize("mode", ["tf", "tfidf"])
def test_auto_matches_the_definition_on_random_steps(mode):
    """Many shapes, ties at the cut included (counts 1-3, df 0-2), some capped: the float reference
    and the fixed-point mass agree (the idf's 2^-20 rounding moves a threshold by ~1e-6 of a score:
    a prefix would have to land that close to it to differ, which these draws do not)."""
    capped = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        N, B = 400, 6
        touched = int(torch.randint(3, 200, (), generator=g))
        ids = torch.randperm(N, generator=g)[:touched].tolist()
        counts = torch.randint(1, 4, (touched,), generator=g).tolist()
        df = torch.randint(0, 3, (N,), generator=g, dtype=torch.int32)
        share = float(torch.rand((), generator=g)) * 0.9 + 0.1
        t_max = int(torch.randint(1, touched + 5, (), generator=g))
        table = counted_table(N, ids, counts)
        index = index_for(table, dict(enumerate(df.tolist())), B)
        idf = {i: math.log((B + 1) / (df[i].item() + 1)) for i in range(N)} if mode == "tfidf" else {}
        want = reference_auto(ids, counts, idf, share, t_max)
        got, stats = select_top_t(table, index, t_max, mode, auto_mass=share)
        assert got.tolist() == want, (seed, share, t_max)
        capped += len(want) == t_max
    assert 0 < capped < 40  # both regimes were exercised


def test_auto_refuses_mode_all():
    with pytest.raises(ValueError, match="auto_mass"):
        select_top_t(counted_table(10, [1, 2], [1, 1]), None, 5, "all", auto_mass=0.5)


def test_auto_config_is_validated():
    cfg = load_config(SPARSE, ["selection.top_t=auto", "selection.top_t_max=40", "selection.auto_mass=0.3"])
    assert (cfg.selection.top_t, cfg.selection.max_rows, cfg.selection.auto_mass) == ("auto", 40, 0.3)
    assert load_config(SPARSE, ["selection.top_t=30"]).selection.max_rows == 30
    for overrides, message in [
        (["selection.top_t=auto"], "needs selection.top_t_max >= 1"),
        (["selection.top_t=auto", "selection.top_t_max=0"], "needs selection.top_t_max >= 1"),
        (["selection.top_t=auto", "selection.top_t_max=40", "selection.auto_mass=0"], r"auto_mass=0\.0 must be in"),
        (["selection.top_t=auto", "selection.top_t_max=40", "selection.auto_mass=1.5"], "must be in"),
        (["selection.top_t=auto", "selection.top_t_max=40", "selection.mode=all"], "selection.mode=all selects"),
        (["selection.top_t=several"], "must be an integer >= 1 or auto"),
        (["selection.top_t=0"], "must be an integer >= 1 or auto"),
        (["selection.top_t=30", "selection.top_t_max=40"], "top_t_max=40 applies to selection.top_t=auto only"),
        (["selection.top_t=30", "selection.auto_mass=0.7"], "auto_mass=0.7 applies to selection.top_t=auto only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(SPARSE, overrides)


def test_memory_plan_bounds_auto_t_by_its_cap():
    """The plan's row gradients and row state under auto are those of a fixed t = top_t_max."""
    # adamw: row state the plan counts, at capacities 64 (t 50) and 128 (t 70)
    common = ["optim.memory_optimizer=adamw", "steps=1"]
    auto = memory_plan(load_config(SPARSE, common + ["selection.top_t=auto", "selection.top_t_max=70"]), 1, 1)
    fixed = memory_plan(load_config(SPARSE, common + ["selection.top_t=70"]), 1, 1)
    smaller = memory_plan(load_config(SPARSE, common + ["selection.top_t=50"]), 1, 1)
    for part in ("memory_row_grads", "memory_optimizer"):
        assert auto["parts"][part] == fixed["parts"][part] > smaller["parts"][part], part


def test_missing_cap_is_one_error_line(tmp_path):
    r = run_cli([PY, "launchers/train.py", "--config", str(SPARSE), f"out_dir={tmp_path}", "selection.top_t=auto"],
                check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "selection.top_t_max" in errors[0]


def test_trainer_step_with_auto_updates_exactly_the_chosen_rows(tiny_data, tiny_pretrained):
    """One sparse finetune step through the real Trainer (the tiny pretrained model, its df index):
    the rows that move are exactly the reference auto-t set of the step's counts, and t is
    input-dependent (strictly between 1 and the cap)."""
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_run

    t_max = 300
    cfg = load_config(SPARSE, [f"model.init_from={tiny_pretrained}", "selection.top_t=auto",
                               f"selection.top_t_max={t_max}", "selection.auto_mass=0.5", "ledger.enabled=false",
                               *data_overrides(tiny_data)])
    tr = build_run(cfg, init_distributed(cfg.dist))
    (table,), (index,) = tr.tables, tr.df_indexes
    x = torch.randint(3, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len),
                      generator=torch.Generator().manual_seed(0))
    before = table.weight.detach().clone()
    metrics = tr.train_step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    ids, counts = (v.tolist() for v in table.access_counts())  # the step's counts (cleared at the next step)
    df = index.lookup(torch.tensor(ids)).tolist()
    idf = {i: math.log((index.num_batches + 1) / (d + 1)) for i, d in zip(ids, df)}
    want = reference_auto(ids, counts, idf, 0.5, t_max)
    moved = (table.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert 1 < len(want) < min(t_max, len(ids)), (len(want), len(ids))
    assert moved == want and metrics["rows_selected"] == len(want)
