"""selection.top_t=auto on real gloo ranks: the chosen t and rows are the same on every rank and for
any rank count (1, 2, 3: uneven shards 22/21/21 of 64 rows) as in one process on the global batch.

Each step's score mass is summed over ranks in integers, so no rank count can round the share's
threshold differently; the ranking is the fixed-t one (ties to the lowest slot)."""
from __future__ import annotations

import pytest
import torch

from smft_dist.config import DistConfig, SelectionConfig
from smft_dist.distributed import context_from_group, shard_memory
from smft_dist.optim import freeze_dense
from smft_dist.selection import build_background_index, select_for_model
from tests.dist.helpers import run_ranks
from tests.dist.test_selection_dist import BATCH, SEQ
from tests.test_selection import tiny_model

STEPS = 4
# (share, cap): the share alone sets t (the cap, 60, is above every step's t: measured 3-9 of the
# 64 slots), and a cap that binds on the flatter steps (measured: 12, 12, 12, then 9 on the most peaked)
SETTINGS = [(0.5, 60), (0.9, 12)]


def _selections(model, tables, part) -> list[tuple]:
    """Background df, then forward STEPS global batches (this process's `part` of each) and select
    under each setting: -> [(share, cap, step, selected ids, rows_selected)]."""
    indexes = build_background_index(model, [part(x) for x in _batches(5, seed=1)], 5, tables, corpus="test")
    out = []
    for step, x in enumerate(_batches(STEPS, seed=2)):
        for t in tables:
            t.zero_step()
        model(input_ids=part(x))  # a forward that may train: it records the counts
        for share, cap in SETTINGS:  # the counts stay: every setting selects from the same step
            sel_cfg = SelectionConfig(top_t="auto", top_t_max=cap, auto_mass=share, mode="tfidf")
            (ids,), (stats,) = select_for_model(tables, indexes, sel_cfg)
            out.append((share, cap, step, ids.tolist(), stats.selected))
    return out


def _batches(num: int, seed: int) -> list[torch.Tensor]:
    """Global batches of BATCH x SEQ random tokens; in batch k the first 2 x (k mod 4) positions of
    every row hold one token, whose slots then gather a growing share of the counts (flat to
    peaked, so t differs per step)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num):
        x = torch.randint(1, 64, (BATCH, SEQ), generator=g)
        x[:, : 2 * (k % 4)] = x[0, 0]
        out.append(x)
    return out


def reference():
    model = tiny_model()
    freeze_dense(model)
    return _selections(model, [model.memory_layers()[0].values], lambda x: x)


def _body(rank, world):
    ctx = context_from_group(DistConfig())
    model = tiny_model()
    freeze_dense(model)
    tables = shard_memory(model, ctx)
    part = lambda x: torch.tensor_split(x, world)[rank]  # noqa: E731
    return _selections(model, tables, part), (tables[0].row_start, tables[0].row_end)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_auto_t_is_the_same_on_every_rank_and_rank_count(world):
    ref = reference()
    sizes = {(share, cap): {n for s, c, _, _, n in ref if (s, c) == (share, cap)} for share, cap in SETTINGS}
    assert len(sizes[SETTINGS[0]]) > 1 and max(sizes[SETTINGS[0]]) < SETTINGS[0][1]  # t varies with the step
    assert SETTINGS[1][1] in sizes[SETTINGS[1]] and len(sizes[SETTINGS[1]]) > 1  # the cap binds, not always
    assert all(len(ids) == n for *_, ids, n in ref)
    results = run_ranks(_body, world)
    assert len({r[1] for r in results}) == world  # really sharded
    for selections, _ in results:
        assert selections == ref
