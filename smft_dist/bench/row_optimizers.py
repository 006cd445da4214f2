"""The memory's row-wise optimizers on the CPU demo, against AdamW on the same seeds (docs/design.md §1.3).

Each run is a folder written by `launchers/continual.py --config configs/demo/levers.yaml` with one
pretraining seed and the pretraining override under study (the commands: docs/design.md §1.3). This
reads each run's report.json and, for every optimizer and seed, the targets of issue "Memories past
GPU memory" against the AdamW model of the same seed:

- known-fact F1 within 0.03 of AdamW's (`known_f1_vs_adamw`);
- zeroing the memory costs at least 0.3 known-fact F1 (`zeroing_cost`);
- the continual benchmark's sparse row passes every check that AdamW's passes on that seed
  (`checks`: the report's PASS/FAIL per check key, both tasks; `lost`: the keys AdamW's passes and
  this one fails, `gained` the reverse).

    python -m smft_dist.bench.row_optimizers adamw=runs/levers/s0_3000,runs/levers/s1_3000 \\
        rowwise_adagrad=runs/levers/rowwise_lr03_s0,runs/levers/rowwise_lr03_s1 \\
        --out benchmarks/results/row_optimizers.json

prints the markdown table that docs/design.md §1.3 quotes (tests/test_docs.py checks it is the JSON's).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from smft_dist.bench import write_results
from smft_dist.errors import UserError, console_script

BASELINE = "adamw"
KNOWN_F1_MARGIN = 0.03
ZEROING_COST = 0.3


def read_run(folder: Path) -> dict:
    """-> {seed, known_f1, zeroing_cost, heldout_nll, checks: {task/key: PASS|FAIL}, levels} of one
    single-seed run folder."""
    report = json.loads((folder / "report.json").read_text())
    (seed, pretrained), = report["pretrained"].items()
    memory = pretrained["memory"]
    checks, values = {}, {}
    for task, result in report["tasks"].items():
        for check in result["checks"]:
            if check.get("key"):
                checks[f"{task}/{check['key']}"] = check["status"]
                values[f"{task}/{check['key']}"] = check.get("value")
    return {"run": str(folder), "seed": int(seed), "known_f1": memory["known_f1"],
            "zeroing_cost": round(memory["known_f1"] - memory["known_f1_memory_zeroed"], 4),
            "heldout_nll": round(memory["heldout_nll"], 4), "checks": checks, "values": values}


def compare(groups: dict[str, list[Path]]) -> list[dict]:
    """-> one record per run (`read_run`, with its optimizer), each non-baseline run judged against
    the baseline run of its seed: known_f1_vs_adamw, known_f1_ok, zeroing_ok, and the sparse row's
    checks it `lost` and `gained`."""
    runs = {name: sorted((read_run(f) for f in folders), key=lambda r: r["seed"]) for name, folders in groups.items()}
    base = {r["seed"]: r for r in runs[BASELINE]}
    records = []
    for name, rows in runs.items():
        for r in rows:
            record = {"optimizer": name, **r}
            if name != BASELINE:
                b = base.get(r["seed"])
                if b is None:
                    raise UserError(f"{name} has seed {r['seed']}, which {BASELINE} has not: add its run "
                                    f"(docs/design.md §1.3 gives the command)")
                record.update(
                    known_f1_vs_adamw=round(r["known_f1"] - b["known_f1"], 4),
                    known_f1_ok=r["known_f1"] >= b["known_f1"] - KNOWN_F1_MARGIN,
                    zeroing_ok=r["zeroing_cost"] >= ZEROING_COST,
                    lost=sorted(k for k, s in b["checks"].items() if s == "PASS" and r["checks"].get(k) != "PASS"),
                    gained=sorted(k for k, s in r["checks"].items() if s == "PASS" and b["checks"].get(k) != "PASS"))
            records.append(record)
    return records


def markdown(records: list[dict]) -> str:
    """One row per optimizer and seed: the pretrained model, the sparse row's within-budget level and
    the checks it loses or gains against AdamW's model of the same seed."""
    lines = ["| optimizer | seed | known F1 | zeroing cost | held-out NLL | sparse within 5% | full forgets / sparse | "
             "checks lost vs AdamW | gained |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        baseline = r["optimizer"] == BASELINE
        lost = "(baseline)" if baseline else ", ".join(r["lost"]) or "none"
        gained = "" if baseline else ", ".join(r["gained"]) or "none"
        lines.append(f"| {r['optimizer']} | {r['seed']} | {r['known_f1']:.3f} | {r['zeroing_cost']:.3f} | "
                     f"{r['heldout_nll']:.3f} | {r['values'].get('facts/level') or '-'} | "
                     f"{r['values'].get('facts/forgets:full') or '-'} | {lost} | {gained} |")
    return "\n".join(lines)


@console_script
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", help="name=run_folder[,run_folder...]; one named adamw")
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    groups = {}
    for spec in args.groups:
        name, sep, folders = spec.partition("=")
        paths = [Path(f) for f in folders.split(",") if f]
        missing = [str(p) for p in paths if not (p / "report.json").is_file()]
        if not sep or not paths or missing:
            raise UserError(f"{spec!r} must be name=folder[,folder...] of finished runs "
                            f"(no report.json in {missing or 'none given'})")
        groups[name] = paths
    if BASELINE not in groups:
        raise UserError(f"no {BASELINE}=... group: the targets are judged against AdamW's runs")
    records = compare(groups)
    write_results(args.out, "row_optimizers", args, records)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
