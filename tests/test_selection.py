"""TF-IDF scores, top-t selection and the background df index (single process)."""
import math

import pytest
import torch

from smft_dist.memory.values import LocalValueTable, ValueTable
from smft_dist.model import SmftConfig, SmftForCausalLM
from smft_dist.selection import (BackgroundIndex, build_background_index, global_total, select_for_model,
                                 select_top_t, tfidf_scores)


def tiny_model(seed: int = 0, n_keys: int = 8, value_dtype: str = "float32") -> SmftForCausalLM:
    torch.manual_seed(seed)
    cfg = SmftConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     memory_layers=[1], memory_n_keys=n_keys, memory_heads=2, memory_knn=4, memory_k_dim=16,
                     memory_value_dim=16, memory_value_dtype=value_dtype, pad_token_id=0)
    return SmftForCausalLM(cfg)


def counted_table(num_rows: int, ids: list[int], counts: list[int]) -> LocalValueTable:
    """A table whose step counts are `counts` at `ids` (recorded by a lookup of those rows)."""
    table = LocalValueTable(num_rows, 4)
    table.fetch(torch.tensor(ids), torch.tensor(counts))
    return table


def index_for(table: ValueTable, df: dict[int, int], num_batches: int) -> BackgroundIndex:
    index = BackgroundIndex.empty(table)
    for i, d in df.items():
        index.df[i] = d
    index.num_batches = num_batches
    return index


def test_tfidf_scores_hand_computed():
    counts, df = torch.tensor([3, 1, 2]), torch.tensor([0, 4, 1], dtype=torch.int32)
    got = tfidf_scores(counts, 6, df, 4, "tfidf")
    want = torch.tensor([3 / 6 * math.log(5 / 1), 1 / 6 * math.log(5 / 5), 2 / 6 * math.log(5 / 2)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(tfidf_scores(counts, 6, None, 0, "tf"), counts.double() / 6)
    with pytest.raises(ValueError, match="background df index"):
        tfidf_scores(counts, 6, None, 0, "tfidf")


def test_global_total_local():
    assert global_total(torch.tensor([3, 4, 5]), None) == 12


def test_ties_go_to_the_lowest_slot():
    table = counted_table(10, [7, 2, 5, 9], [2, 2, 2, 2])
    index = index_for(table, {}, 8)
    ids, stats = select_top_t(table, index, 2, "tfidf")
    assert ids.tolist() == [2, 5]
    assert (stats.candidates, stats.total, stats.selected, stats.selected_accesses) == (4, 8, 2, 4)


def test_tf_and_tfidf_pick_different_rows():
    table = counted_table(10, [1, 2, 3], [5, 3, 1])
    index = index_for(table, {1: 8}, 8)  # row 1 is in every background batch: idf 0
    assert select_top_t(table, index, 2, "tfidf")[0].tolist() == [2, 3]
    assert select_top_t(table, index, 2, "tf")[0].tolist() == [1, 2]


def test_all_selects_every_touched_row():
    table = counted_table(50, [40, 3, 17, 8], [1, 9, 2, 2])
    ids, stats = select_top_t(table, None, 1, "all")
    assert ids.tolist() == [3, 8, 17, 40] and stats.coverage == 1.0


def test_matches_a_dense_reference_ranking():
    g = torch.Generator().manual_seed(0)
    N, B, t = 200, 20, 30
    ids = torch.randperm(N, generator=g)[:120]
    counts = torch.randint(1, 4, (120,), generator=g)  # small ints: many exact ties
    table = counted_table(N, ids.tolist(), counts.tolist())
    df = torch.randint(0, B + 1, (N,), generator=g, dtype=torch.int32)
    index = index_for(table, dict(enumerate(df.tolist())), B)
    got, _ = select_top_t(table, index, t, "tfidf")
    # dense reference: every slot's score, untouched ones excluded; order by (-score, slot)
    c = torch.zeros(N, dtype=torch.long).index_put_((ids,), counts)
    score = [(-(c[i].item() / int(counts.sum())) * math.log((B + 1) / (df[i].item() + 1)), i)
             for i in range(N) if c[i] > 0]
    want = sorted(i for _, i in sorted(score)[:t])
    assert got.tolist() == want


def test_select_for_model_restricts_the_backward_to_selected_rows():
    model = tiny_model()
    table = model.memory_layers()[0].values
    x = torch.randint(1, 64, (2, 8))
    table.zero_step()
    loss = model(input_ids=x, labels=x).loss
    cfg = type("Sel", (), {"top_t": 5, "mode": "tf"})()
    (sel,), (stats,) = select_for_model([table], None, cfg)
    assert sel.numel() == 5 and stats.candidates > 5
    loss.backward()
    rows, _ = table.sparse_grad()
    assert set(rows.tolist()) <= set(sel.tolist())


def _slots_per_batch(model, batches) -> list[set]:
    """Reference: the slots the product keys emit for each batch (hooked, independent of counts)."""
    seen = []
    hook = model.memory_layers()[0].keys.register_forward_hook(lambda m, i, out: seen[-1].update(out[0].flatten().tolist()))
    with torch.no_grad():
        for b in batches:
            seen.append(set())
            model(**b)
    hook.remove()
    return seen


def test_background_index_counts_a_row_once_per_batch_and_skips_padding():
    model = tiny_model()
    batches = []
    for i in range(4):
        x = torch.randint(1, 64, (2, 8))
        mask = torch.ones_like(x)
        mask[0, 5:] = 0  # padding makes no accesses
        batches.append({"input_ids": x, "attention_mask": mask})
    (index,) = build_background_index(model, batches, 4, corpus="unit test")
    want = torch.zeros(64, dtype=torch.int32)
    for slots in _slots_per_batch(model, batches):
        want[list(slots)] += 1
    assert torch.equal(index.df, want) and index.num_batches == 4
    with pytest.raises(ValueError, match="ran out after 4 batches"):
        build_background_index(model, batches, 5)


def test_background_index_save_load_reshard_and_refusal(tmp_path):
    table = LocalValueTable(10, 4)
    index = BackgroundIndex(torch.arange(10, dtype=torch.int32), 7, 10, 0, 10, "synthetic: pretrain mix")
    index.save(tmp_path / "df.safetensors")
    back = BackgroundIndex.load(tmp_path / "df.safetensors", table)
    assert torch.equal(back.df, index.df) and (back.num_batches, back.corpus) == (7, "synthetic: pretrain mix")
    shard = BackgroundIndex.load(tmp_path / "df.safetensors", ValueTable(10, 4, 3, 8))
    assert shard.df.tolist() == [3, 4, 5, 6, 7] and (shard.row_start, shard.row_end) == (3, 8)
    with pytest.raises(ValueError, match="built for 10 slots, model has 16: rebuild it with mode=background_index"):
        BackgroundIndex.load(tmp_path / "df.safetensors", LocalValueTable(16, 4))


@pytest.mark.parametrize("mode", ["tf", "tfidf"])
def test_partial_top_t_keeps_exact_ties_by_lowest_slot(mode):
    """The local top-t (a partial topk, then the lowest slots among the rows tied at the t-th score)
    equals a full (-score, slot) sort, over shapes where ties at the t-th score are many (counts
    1-2, df 0-1), few, or fewer than the rows topk must drop."""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        N, B = 300, 4
        touched = int(torch.randint(5, 150, (), generator=g))
        t = int(torch.randint(1, touched, (), generator=g))
        ids = torch.randperm(N, generator=g)[:touched]
        counts = torch.randint(1, 2 + seed % 3, (touched,), generator=g)
        df = torch.randint(0, 1 + seed % 4, (N,), generator=g, dtype=torch.int32)
        table = counted_table(N, ids.tolist(), counts.tolist())
        index = index_for(table, dict(enumerate(df.tolist())), B)
        got, stats = select_top_t(table, index, t, mode)
        idf = {i: math.log((B + 1) / (df[i].item() + 1)) if mode == "tfidf" else 1.0 for i in range(N)}
        total = int(counts.sum())
        ranked = sorted((-(c / total) * idf[i], i) for i, c in zip(ids.tolist(), counts.tolist()))
        assert got.tolist() == sorted(i for _, i in ranked[:t]), (seed, t, touched)
        assert int(stats.selected_accesses) == sum(c for i, c in zip(ids.tolist(), counts.tolist()) if i in got)
