"""`smft_dist.bench.offload` on a tiny table: the resident and offloaded variants it compares are
the real ones (the offloaded shard moves rows, the resident one none) and give bitwise the same
step, in sparse finetuning and in pretraining (docs/offload.md, Exactness)."""
from __future__ import annotations

from smft_dist.bench.offload import parse_args, run

# 2 gloo ranks, a 1,024-slot table (512 rows per rank), 2-layer d 64 model, 32 tokens per rank.
TINY = ["--world", "2", "--slots", "1024", "--hidden", "64", "--layers", "2", "--knn", "8", "--k-dim", "16",
        "--value-dim", "8", "--seq", "16", "--batch", "2", "--vocab", "128", "--steps", "3", "--warmup", "0",
        "--background", "2", "--top-t", "20"]


def test_offload_benchmark_compares_bitwise_equal_variants_that_move_rows():
    finetune, pretrain = run(parse_args(TINY))  # one spawn for both modes (process start-up dominates)
    D = 8
    for r in (finetune, pretrain):
        assert r["bitwise_equal"], r["mode"]  # losses, updated rows (and pretraining's dense weights), every rank
        assert r["losses"]["none"] == r["losses"]["host"] and len(r["losses"]["host"]) == 3, r
        assert r["resident_moved_rows"] == 0, r  # the baseline is resident: it moves nothing
        for moved, updated in zip(r["moved_per_rank"], r["rows_updated_per_rank"]):  # over the 3 steps
            # one memory layer, one micro-batch: each step hands the host one gradient per row the
            # optimizer then updates there; every row read is counted with its 8-byte id
            assert moved["rows_d2h"] == updated > 0, (moved, updated)
            assert moved["bytes_h2d"] == 4 * D * moved["rows_h2d"], moved
            assert moved["bytes_d2h"] == 8 * moved["rows_h2d"] + (8 + 4 * D) * moved["rows_d2h"], moved
    for moved in finetune["moved_per_rank"]:
        # each step's lookup reads some of the rank's 512 rows once (frozen queries: no backward re-read)
        assert 0 < moved["rows_h2d"] <= 3 * 512, moved
    for moved in pretrain["moved_per_rank"]:
        # every touched row gets a gradient; the pooled exchange reads the rows again in the backward,
        # the row exchange does not (dist.memory_exchange=auto picks per step)
        assert moved["rows_d2h"] <= moved["rows_h2d"] <= 2 * moved["rows_d2h"], moved
    # sparse finetuning updated its top-t (20 over both ranks) rows in each of the 3 steps
    assert sum(finetune["rows_updated_per_rank"]) == 3 * 20, finetune


def offload_row(r: dict) -> str:
    """A row of docs/benchmarks.md's offload table, from one result of offload.json (traffic: the
    mean over ranks of the per-step mean)."""
    per_rank = r["moved_per_step_per_rank"]
    mean = lambda k: sum(m[k] for m in per_rank) / len(per_rank)  # noqa: E731
    return (f"| {r['mode']} | {r['slots']:,} | {r['median_step_s']['none']:.3f} | {r['median_step_s']['host']:.3f} "
            f"| {r['ratio_of_medians']:.3f} | {r['step_ratio_offloaded_vs_resident']:.3f} | {mean('rows_h2d'):,.0f} "
            f"| {mean('rows_d2h'):,.0f} | {(mean('bytes_h2d') + mean('bytes_d2h')) / 1e6:.2f} MB "
            f"| {'yes' if r['bitwise_equal'] else 'NO'} |")


def test_benchmarks_page_quotes_the_offload_and_flatness_results():
    """docs/benchmarks.md's offload table and its finetune-step table up to the largest table quote
    benchmarks/results/offload.json and finetune_step_flat.json as the runs wrote them."""
    from tests.test_docs import ROOT, _json, finetune_step_row

    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    rows = [offload_row(r) for r in _json("offload.json")["results"]]
    rows += [finetune_step_row(r) for r in _json("finetune_step_flat.json")["results"]]
    missing = [row for row in rows if row not in page]
    assert len(rows) >= 4 and not missing, "rows as the JSON gives them:\n" + "\n".join(missing)
