"""Sparse memory finetuning on real gloo ranks == one process on the concatenated global batch.

Each rank runs its slice of every global batch with a row-sharded table (64 rows: uneven shards
over 3 ranks, 22/21/21). Compared with a single-process reference: the background df, the selected
set of every step (exact), the updated rows (to float tolerance: the ranks' gradient partial sums
are added in another order), and every row outside the selected sets (bitwise unchanged).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smft_dist.config import DistConfig
from smft_dist.distributed import context_from_group, gather_full_table, shard_memory
from smft_dist.optim import MaskedSGD, freeze_dense
from smft_dist.selection import BackgroundIndex, build_background_index, select_for_model, select_top_t
from tests.dist.helpers import run_ranks
from tests.test_selection import tiny_model

BATCH, SEQ, STEPS, LR = 6, 8, 3, 5.0
SEL = type("Sel", (), {"top_t": 7, "mode": "tfidf"})()


def _data(num: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (BATCH, SEQ), generator=g) for _ in range(num)]


def _loss(model, x_BS: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over this slice's tokens / the global batch's token count, so the
    ranks' gradients add up to the gradient of the global mean loss."""
    logits = model(input_ids=x_BS).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x_BS[:, 1:].reshape(-1), reduction="sum") / (
        BATCH * (SEQ - 1))


def _finetune(model, tables, part, df_path=None):
    """Background df, then STEPS sparse steps. `part(x)` is this process's slice of a global batch."""
    indexes = build_background_index(model, [part(x) for x in _data(5, seed=1)], 5, tables, corpus="test")
    if df_path is not None:
        indexes[0].save(df_path)
    opt = MaskedSGD(tables, LR)
    selected = []
    for x in _data(STEPS, seed=2):
        for t in tables:
            t.zero_step()
        loss = _loss(model, part(x))
        sel, _ = select_for_model(tables, indexes, SEL)
        for mode in ("tf", "all"):  # the ablations' sets from the same (already global) counts
            ids, stats = select_top_t(tables[0], None, SEL.top_t, mode)
            selected.append((mode, ids.tolist(), stats.candidates, stats.total))
        loss.backward()
        for t in tables:
            if getattr(t, "replicate_group", None) is not None:
                t.sync_replicas()  # replicas: sum the gradients of both copies' tokens
        opt.step(sel)
        selected.append(("tfidf", sel[0].tolist()))
    return indexes[0], selected


def reference():
    model = tiny_model()
    freeze_dense(model)
    table = model.memory_layers()[0].values
    before = table.weight.detach().clone()
    index, selected = _finetune(model, [table], lambda x: x)
    return index.df, selected, before, table.weight.detach().clone()


def _body(rank, world, dp_replicate, df_path):
    ctx = context_from_group(DistConfig(dp_replicate=dp_replicate))
    model = tiny_model()
    freeze_dense(model)
    tables = shard_memory(model, ctx)
    before = gather_full_table(tables[0])
    part = lambda x: torch.tensor_split(x, world)[rank]  # noqa: E731
    index, selected = _finetune(model, tables, part, df_path)
    assert (index.row_start, index.row_end) == (tables[0].row_start, tables[0].row_end)
    return index.full(), selected, before, gather_full_table(tables[0]), (tables[0].row_start, tables[0].row_end)


@pytest.mark.parametrize("world,dp_replicate", [(2, 1), (3, 1), (2, 2)])
def test_sparse_finetune_matches_single_process(world, dp_replicate, tmp_path):
    df_ref, sel_ref, before_ref, after_ref = reference()
    results = run_ranks(_body, world, dp_replicate, str(tmp_path / "df.safetensors"))
    if dp_replicate == 1:
        assert len({r[4] for r in results}) == world  # really sharded (uneven: 64 rows)
    ever = torch.zeros(64, dtype=torch.bool)
    ever[sorted({i for s in sel_ref if s[0] == "tfidf" for i in s[1]})] = True
    assert any(s[0] == "all" and len(s[1]) > SEL.top_t for s in sel_ref)
    for df, selected, before, after, _ in results:
        assert torch.equal(df, df_ref), "df index differs from the single-process one"
        assert selected == sel_ref, "selected rows differ from the single-process ranking"
        assert torch.equal(before, before_ref)
        assert torch.equal(after[~ever], before[~ever]), "a row outside the selected sets changed"
        torch.testing.assert_close(after[ever], after_ref[ever], rtol=1e-5, atol=1e-6)
        assert (after[ever] != before[ever]).any(dim=1).all()
    # the file saved by the ranks loads in one process, equal to the reference df
    loaded = BackgroundIndex.load(tmp_path / "df.safetensors", tiny_model().memory_layers()[0].values)
    assert torch.equal(loaded.df, df_ref) and loaded.num_batches == 5 and loaded.corpus == "test"
