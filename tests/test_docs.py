"""Every `docs/design.md §N` citation in the repository names a heading of docs/design.md, and no
file cites the design notes outside the repository."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ["smft_dist", "configs", "launchers", "slurm", "tests", "docs", "README.md"]
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".txt", ".json", ".toml", ".cfg"}
# A citation: the page name, then one section number or several ("§1.2, §2.4 and §5").
CITATION = re.compile(r"design\.md\s*((?:§\d+(?:\.\d+)*)(?:\s*(?:,|and|/)\s*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
# Spelled in pieces so that this file's own examples are not citations.
DOC = "docs/design" + ".md"
FORBIDDEN = ["DESIGN" + " §", "../" + "shared"]


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        candidates = [p] if p.is_file() else sorted(p.rglob("*"))
        files += [f for f in candidates if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts]
    return files


def section_numbers(markdown: str) -> set[str]:
    """-> {"1", "1.1", ...}: the numbers that open the headings of a markdown page."""
    return set(HEADING.findall(markdown))


def citations(text: str) -> list[str]:
    """-> every section number cited as `design.md §N` (with the sections listed after it)."""
    return [num for group in CITATION.findall(text) for num in SECTION.findall(group)]


def unresolved(files: list[Path], sections: set[str], root: Path = ROOT) -> list[str]:
    """-> "path:line: §N" for every citation of a section that is not a heading."""
    bad = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            bad += [f"{f.relative_to(root)}:{lineno}: §{n}" for n in citations(line) if n not in sections]
    return bad


def test_parsers_on_known_text():
    assert section_numbers("# title\n## 1. The method\n### 1.1 Memory layer\n## 2 Shape\ntext 3.1 x\n") == {
        "1", "1.1", "2"}
    assert citations(f"({DOC} §1.2, §2.4 and §5) and paper §4") == ["1.2", "2.4", "5"]
    assert citations(f"see {DOC} §9.9; paper §3") == ["9.9"]


def test_every_design_citation_resolves_to_a_heading():
    sections = section_numbers(DESIGN.read_text(encoding="utf-8"))
    assert {"1", "1.1", "1.2", "1.3", "1.4", "2", "5"} <= sections, sorted(sections)
    files = scanned_files()
    assert len([n for f in files for n in citations(f.read_text(encoding="utf-8", errors="replace"))]) >= 20
    bad = unresolved(files, sections)
    assert not bad, "citations of sections docs/design.md does not have:\n" + "\n".join(bad)


def test_a_missing_section_is_reported(tmp_path):
    f = tmp_path / "x.py"
    f.write_text(f'"""See {DOC} §1.1 and §42."""\n')
    assert unresolved([f], {"1", "1.1"}, root=tmp_path) == ["x.py:1: §42"]


def test_no_file_cites_the_design_notes_outside_the_repository():
    hits = []
    for f in scanned_files():
        for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{f.relative_to(ROOT)}:{lineno}: {line.strip()}" for s in FORBIDDEN if s in line]
    assert not hits, "cite docs/design.md instead:\n" + "\n".join(hits)


HEADLINES = [ROOT / "docs" / "demo" / "headline.md", ROOT / "docs" / "demo" / "seeds" / "headline.md"]
TABLE = re.compile(r"^\|.*\|\n(?:\|.*\|\n?)+", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_demo_results_show_the_headlines_as_the_runs_wrote_them():
    """docs/demo_results.md holds the committed runs' headline.md files, unedited."""
    page = (ROOT / "docs" / "demo_results.md").read_text(encoding="utf-8")
    for path in HEADLINES:
        table = path.read_text(encoding="utf-8").strip()
        assert table and table in page, f"docs/demo_results.md does not hold {path.relative_to(ROOT)} verbatim: copy it in"


def test_readme_headline_tables_are_the_runs_tables():
    """The README's headline quotes the main command's run's two tables (fact learning, document QA)
    as the run wrote them: a number edited by hand, or a rerun not copied in, fails here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tables = TABLE.findall(HEADLINES[0].read_text(encoding="utf-8"))
    assert len(tables) == 2, tables
    for table in tables:
        assert table.strip() in readme, f"README.md does not quote this table of {HEADLINES[0].relative_to(ROOT)}:\n{table}"


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (outside code blocks): lower case, punctuation but `-`
    dropped, spaces -> `-`."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    """-> "page: target" for every relative link of a markdown page whose file, or heading, is missing."""
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT not in dest.parents:
            bad.append(f"{page.relative_to(ROOT)}: {target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return bad


def test_heading_anchors():
    assert heading_anchors("## Paper scale: precision, memory, accumulation\n### `smft-inspect --plan`\n"
                           "## The continual benchmark's keys\n```bash\n# a comment\n```\n") == {
        "paper-scale-precision-memory-accumulation", "smft-inspect---plan", "the-continual-benchmarks-keys"}


def test_every_link_of_the_readme_and_docs_resolves():
    """The README's and docs/*.md's relative links name files that exist and headings they have."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = [b for page in pages for b in broken_links(page)]
    assert not bad, "links to missing files or headings:\n" + "\n".join(bad)


RESULTS = ROOT / "benchmarks" / "results"


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def lookup_row(r: dict) -> str:
    """A row of docs/benchmarks.md's lookup table, from one `smft_dist.bench.lookup` JSON."""
    mb = lambda b: f"{b / 1e6:,.2f} MB" if b < 1e7 else f"{b / 1e6:,.1f} MB"
    return (f"| {r['slots']:,} | {r['value_dim']} | {r['skew']} | {100 * r['touched_fraction']:.1f}% "
            f"| {mb(r['bytes_sent_per_step'])} | {mb(r['lower_bound_bytes'])} ({r['bytes_over_lower_bound']:.3f}x) "
            f"| {r['allgather_table_bytes'] / 1e6:,.1f} MB | {r['allreduce_dense_grad_bytes'] / 1e6:,.1f} MB "
            f"| {1e3 * r['sharded_s']:.1f} / {1e3 * r['local_s']:.1f} ms | {r['max_abs_err']:.1e} |")


def finetune_step_row(r: dict) -> str:
    """A row of docs/benchmarks.md's finetune-step table, from one result of finetune_step.json."""
    twin = "(is the twin)" if r["slots"] == r["ref_slots"] else f"{r['ref_median_step_s']:.3f}"
    return (f"| {r['slots']:,} | {r['median_step_s']:.3f} | {twin} | {r['median_step_s'] / r['ref_median_step_s']:.3f} "
            f"| {r['step_ratio_vs_ref']:.3f} | {100 * r['sparse_overhead_fraction']:.2f}% | {100 * r['keys_fraction']:.1f}% "
            f"| {max(r['peak_rss_mb_per_rank']) / 1024:.2f} GiB |")


def test_benchmark_tables_are_the_results_files():
    """The benchmark tables of docs/benchmarks.md and docs/patches.md quote benchmarks/results/*.json:
    a rerun whose JSON is not copied into its table, or a number edited by hand, fails here."""
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    lookups = ["lookup_1M_uniform.json", "lookup_16M_uniform.json", "lookup_1M_zipf.json", "lookup_16M_zipf.json",
               "lookup_16K_dense_regime.json"]
    rows = [lookup_row(_json(f)) for f in lookups]
    rows += [finetune_step_row(r) for r in _json("finetune_step.json")["results"]]
    convert = _json("convert.json")["workers"]
    rows += [f"| {w} | {round(r['tokens_per_s']):,} | {r['seconds']:.1f} | {r['speedup_vs_1']:.2f} |"
             for w, r in convert.items()]
    missing = [row for row in rows if row not in page]
    ledger = _json("ledger.json")["results"]
    patches = (ROOT / "docs" / "patches.md").read_text(encoding="utf-8")
    cells = [f"| {1e3 * ledger[k]['median_ledger_s']:.1f} ms | {100 * ledger[k]['ledger_share_of_step']:.2f}% |"
             for k in ("ledger", "ledger_fsync")]
    cells.append(f"share of the step ({ledger['off']['median_step_s']:.2f} s)")
    missing += [c for c in cells if c not in patches]
    assert not missing, "tables that do not quote benchmarks/results (rows as the JSON gives them):\n" + "\n".join(missing)


def config_keys(cls=None, prefix: str = "") -> list[str]:
    """-> every key of a run config, dotted ("model.memory_n_keys"), from the dataclasses of smft_dist.config."""
    import dataclasses

    from smft_dist.config import RunConfig

    keys = []
    for f in dataclasses.fields(cls or RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys += config_keys(type(default), f"{prefix}{f.name}.") if dataclasses.is_dataclass(default) \
            else [f"{prefix}{f.name}"]
    return keys


def test_configuration_reference_names_every_key():
    """docs/configuration.md's table names every config key: a top-level key in a row's first cell,
    a section's key (`eval.qa`) as `qa` in the row of `eval.*`."""
    rows = [r for r in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines() if r.startswith("| `")]
    first_cells = {r.split("|")[1] for r in rows}
    missing = []
    for key in config_keys():
        section, _, leaf = key.rpartition(".")
        if section:
            row = next((r for r in rows if r.startswith(f"| `{section}.*` |")), "")
            missing += [key] if f"`{leaf}`" not in row else []
        else:
            missing += [key] if not any(f"`{key}`" in cell for cell in first_cells) else []
    assert len(config_keys()) > 60 and not missing, f"keys docs/configuration.md does not document: {missing}"


# ----- docs/plan.md's tables are the plan's output -----
PLAN_CONFIGS = ["pretrain_1p3b", "background_index_1p3b", "finetune_triviaqa_sparse_1p3b",
                "finetune_simpleqa_sparse_1p3b", "finetune_triviaqa_full_1p3b", "finetune_triviaqa_lora_1p3b"]
PLAN_GROUPS = {  # a column of the shipped-config table: the plan parts it adds up
    "dense weights": ("dense_weights", "frozen_bf16_weights", "autocast_weight_copies"),
    "dense grads, optimizer, buffers": ("dense_grads", "dense_optimizer", "deepspeed_buffers"),
    "memory shard, row state, row grads": ("memory_values", "memory_optimizer", "memory_optimizer_growth",
                                           "memory_row_grads", "memory_row_grad_sum"),
    "lookup exchange": ("lookup_exchange",),
    "activations + logits": ("activations", "logits"),
}
LARGER_MEMORIES = [(n, gpus) for n in (4096, 11586, 32768) for gpus in (8, 64, 128)]


def shipped_plan_row(name: str) -> str:
    """The row of docs/plan.md's shipped-config table for configs/paper/<name>.yaml at mp 8."""
    from smft_dist.config import load_config
    from smft_dist.model.memory_plan import memory_plan

    plan = memory_plan(load_config(ROOT / "configs" / "paper" / f"{name}.yaml", []), 8, 8)
    s, parts = plan["settings"], plan["parts"]
    engine = {"none": "plain (no trainable dense weight)", "deepspeed": f"DeepSpeed ZeRO-{s['zero_stage']}",
              "fsdp2": "FSDP2"}[s["engine"]]
    groups = [f"{sum(parts[k] for k in keys) / 1e9:.2f}" for keys in PLAN_GROUPS.values()]
    return "| " + " | ".join([f"`{name}`", engine, f"{s['micro_batch']} x {s['seq_len']}", *groups,
                              f"**{plan['total_gb']:.2f}**"]) + " |"


# the larger-memories table's pretraining micro-batch: the paper's 8 x 2048 tokens per GPU and step as
# 8 micro-batches of 1 x 2048, with activation checkpointing
LARGER_MEMORY_MICRO_BATCH = ["data.batch_size=1", "optim.grad_accum=8", "model.activation_checkpointing=true"]


def larger_memory_row(n_keys: int, gpus: int) -> str:
    """The row of docs/plan.md's larger-memories table: pretraining (LARGER_MEMORY_MICRO_BATCH)
    resident under two row optimizers and host-offloaded under row-wise Adagrad with stochastic
    rounding (no fp32 master), and sparse
    finetuning, the paper configs with model.memory_n_keys=n_keys at mp = gpus."""
    from smft_dist.config import load_config
    from smft_dist.model.memory_plan import memory_plan

    paper = ROOT / "configs" / "paper"
    pretrain = [load_config(paper / "pretrain_1p3b.yaml", [f"model.memory_n_keys={n_keys}",
                                                            f"optim.memory_row_optimizer={o}",
                                                            f"model.memory_offload={offload}",
                                                            f"optim.memory_stochastic_rounding={offload == 'host'}",
                                                            *LARGER_MEMORY_MICRO_BATCH])
                for o, offload in (("adamw", "none"), ("rowwise_adagrad", "none"), ("rowwise_adagrad", "host"))]
    finetune = load_config(paper / "finetune_triviaqa_sparse_1p3b.yaml", [f"model.memory_n_keys={n_keys}"])
    plans = [memory_plan(c, gpus, gpus) for c in (*pretrain, finetune)]

    def total(p: dict) -> str:
        return f"{p['total_gb']:.1f}" + ("" if p["total_bytes"] <= 0.9 * 80e9 else " (over 80 x 0.9)")

    host = plans[2]
    cells = [f"{n_keys ** 2 / 1e6:.1f}M ({n_keys}²)", str(gpus), f"{plans[0]['parts']['memory_values'] / 1e9:.2f}",
             f"{plans[0]['parts']['memory_optimizer'] / 1e9:.2f}", f"{plans[1]['parts']['memory_optimizer'] / 1e9:.2f}",
             *(total(p) for p in plans[:3]),
             f"{host['host_gb_per_node']:.0f}" + ("" if host["host_bytes_per_node"] <= 1.5e12 else " (over 1.5 TB)"),
             total(plans[3])]
    return "| " + " | ".join(cells) + " |"


OPTIMIZER_STATE_MEMORIES = [(4096, 8), (4096, 32), (11586, 8), (11586, 128)]


def optimizer_state_row(n_keys: int, gpus: int) -> str:
    """The row of docs/plan.md's optimizer-state table: the paper's pretraining with
    model.memory_n_keys=n_keys at mp = gpus, GB per GPU of memory optimizer state under each row
    optimizer, and the growth (the same for all three)."""
    from smft_dist.config import load_config
    from smft_dist.model.memory_plan import memory_plan

    plans = [memory_plan(load_config(ROOT / "configs" / "paper" / "pretrain_1p3b.yaml",
                                     [f"model.memory_n_keys={n_keys}", f"optim.memory_row_optimizer={o}"]), gpus, gpus)
             for o in ("adamw", "rowwise_adagrad", "adam_rowwise")]
    cells = [f"{n_keys ** 2 / 1e6:.1f}M ({n_keys}²)", str(gpus),
             *(f"{p['parts']['memory_optimizer'] / 1e9:.2f}" for p in plans),
             f"{max(p['parts']['memory_optimizer_growth'] for p in plans) / 1e9:.2f}"]
    return "| " + " | ".join(cells) + " |"


def plan_table_rows() -> list[str]:
    return ([shipped_plan_row(n) for n in PLAN_CONFIGS] + [optimizer_state_row(*r) for r in OPTIMIZER_STATE_MEMORIES]
            + [larger_memory_row(*r) for r in LARGER_MEMORIES])


def test_plan_tables_are_the_plans_output():
    """Every row of docs/plan.md's three plan tables is what `memory_plan` computes today: a change
    of the plan's formulas or of a shipped paper config fails here until the page is regenerated
    (`python -m tests.test_docs` prints the rows). A row must be on the page exactly once: two
    tables share their first cells, so a row pasted into the wrong one fails too."""
    lines = (ROOT / "docs" / "plan.md").read_text().splitlines()
    stale = [row for row in plan_table_rows() if lines.count(row) != 1]
    assert not stale, "docs/plan.md is stale; its rows should be:\n" + "\n".join(stale)
    slot_rows = [line for line in lines if line.startswith("| ") and "²)" in line]
    assert len(slot_rows) == len(OPTIMIZER_STATE_MEMORIES) + len(LARGER_MEMORIES), slot_rows


if __name__ == "__main__":  # the plan tables' rows, to paste into docs/plan.md
    print("\n".join(plan_table_rows()))


def test_design_levers_section_shows_the_measurements():
    """docs/design.md §5.5 quotes the tables and the per-seed checks that
    benchmarks/results/memory_levers.json gives (`python -m smft_dist.bench.memory_levers` prints them)."""
    from smft_dist.bench.memory_levers import markdown, model_groups

    data = json.loads((ROOT / "benchmarks" / "results" / "memory_levers.json").read_text())
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert markdown(data["models"], model_groups(data["models"]), data["correlations"]) in design
    for recipe in data["seed_checks"].values():
        for line in recipe["lines"]:
            assert f"- {line}" in design, line


def test_design_row_optimizer_table_is_the_benchmarks():
    """docs/design.md §1.3 quotes the table `python -m smft_dist.bench.row_optimizers` prints for
    benchmarks/results/row_optimizers.json, and every optimizer it names has AdamW's runs of its seeds."""
    from smft_dist.bench.row_optimizers import BASELINE, markdown

    records = json.loads((ROOT / "benchmarks" / "results" / "row_optimizers.json").read_text())["results"]
    assert markdown(records) in (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    baseline_seeds = {r["seed"] for r in records if r["optimizer"] == BASELINE}
    assert baseline_seeds and all(r["seed"] in baseline_seeds for r in records)
