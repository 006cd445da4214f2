"""What a patch wrote: rows per step and group, rows shared between groups, the most-written rows
with their background df, and a rows-against-steps PNG.

    report = audit(Patch.load("run.smftpatch"), df={"layer2": df_vector_N})
    print("\n".join(report.table()))
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from smft_dist.patch.patch import Patch, PatchError, _ranges


@dataclass
class Audit:
    per_step: list[dict]  # {step, groups, rows: {layer: n}}
    per_group: dict[int, dict[str, list[int]]]  # group -> layer -> sorted rows written
    shared: list[dict]  # {groups: (a, b), layer, rows} for every pair of groups writing common rows
    most_written: list[dict]  # {layer, row, steps, groups, df}
    df_batches: Optional[int] = None
    meta: dict = field(default_factory=dict)
    top: int = 10  # rows and pairs the table lists

    def table(self) -> list[str]:
        out = [f"patch: {len(self.per_step)} steps, memory layers {self.meta.get('layers')}, "
               f"{self.meta.get('num_rows')} rows x {self.meta.get('dim')} ({self.meta.get('dtype')})",
               "", f"{'step':>6}  {'groups':<14} rows written"]
        for s in self.per_step:
            out.append(f"{s['step']:>6}  {_ranges(s['groups']):<14} " + ", ".join(f"{n}: {k}" for n, k in s["rows"].items()))
        if self.per_group:
            out += ["", f"{'group':>6}  {'steps':<14} rows written"]
            for g, layers in sorted(self.per_group.items()):
                steps = [s["step"] for s in self.per_step if g in s["groups"]]
                out.append(f"{g:>6}  {_ranges(steps):<14} " + ", ".join(f"{n}: {len(r)}" for n, r in layers.items()))
            pairs = len(list(itertools.combinations(self.per_group, 2)))
            out += ["", f"rows shared between groups (facts that overlap in memory): {len(self.shared)} of {pairs} "
                        f"pairs{f', the {self.top} largest' if len(self.shared) > self.top else ''}:"]
            out += [f"  groups {o['groups'][0]} & {o['groups'][1]}: {o['layer']}: {len(o['rows'])} rows {o['rows'][:8]}"
                    f"{' ...' if len(o['rows']) > 8 else ''}" for o in self.shared[:self.top]]
        df_head = f"df (of {self.df_batches} batches)" if self.df_batches is not None else "df"
        out += ["", f"most-written rows:  {'layer':<8} {'row':>8} {'steps':>6} {df_head:>22}  groups"]
        for r in self.most_written:
            df = "-" if r["df"] is None else str(r["df"])
            out.append(f"{'':<20}{r['layer']:<8} {r['row']:>8} {r['steps']:>6} {df:>22}  {_ranges(r['groups'])}")
        return out

    def as_dict(self) -> dict:
        return {"per_step": self.per_step, "per_group": {str(g): v for g, v in self.per_group.items()},
                "shared": [{**o, "groups": list(o["groups"])} for o in self.shared],
                "most_written": self.most_written, "df_batches": self.df_batches}


def audit(patch: Patch, df: Optional[dict[str, torch.Tensor]] = None, df_batches: Optional[int] = None,
          top: int = 10) -> Audit:
    """`df`: per layer the N-long background df (a `BackgroundIndex`'s counts), optional."""
    per_step = [{"step": s.step, "groups": s.groups, "rows": {n: int(u.ids.numel()) for n, u in s.layers.items()}}
                for s in patch.steps]
    per_group: dict[int, dict[str, list[int]]] = {}
    for g in sorted({g for s in patch.steps for g in s.groups}):
        steps = [s for s in patch.steps if g in s.groups]
        per_group[g] = {n: patch.touched(n, steps).tolist() for n in patch.layers}
    shared = []
    for a, b in itertools.combinations(sorted(per_group), 2):
        for n in patch.layers:
            common = sorted(set(per_group[a][n]) & set(per_group[b][n]))
            if common:
                shared.append({"groups": (a, b), "layer": n, "rows": common})
    shared.sort(key=lambda o: -len(o["rows"]))  # the most entangled pairs first
    most = []
    for n in patch.layers:
        ids = torch.cat([s.layers[n].ids for s in patch.steps]) if patch.steps else torch.zeros(0, dtype=torch.long)
        rows, counts = torch.unique(ids, return_counts=True)
        for i in torch.argsort(counts, descending=True, stable=True)[:top].tolist():
            row = int(rows[i])
            writers = [s for s in patch.steps if bool((s.layers[n].ids == row).any())]
            most.append({"layer": n, "row": row, "steps": int(counts[i]),
                         "groups": sorted({g for s in writers for g in s.groups}),
                         "df": int(df[n][row]) if df is not None and n in df else None})
    most.sort(key=lambda r: -r["steps"])
    return Audit(per_step, per_group, shared, most[:top], df_batches, patch.meta, top)


def load_df(folder: str | Path, layers: list[str]) -> tuple[dict[str, torch.Tensor], Optional[int]]:
    """The background df vectors saved with a checkpoint (`df/`) or an export (`background_df/`)."""
    from safetensors import SafetensorError, safe_open

    from smft_dist.errors import reason

    folder = Path(folder)
    for sub in ("", "df", "background_df"):
        files = {n: folder / sub / f"{n}.safetensors" for n in layers}
        if all(f.is_file() for f in files.values()):
            out, batches = {}, None
            for n, f in files.items():
                try:
                    with safe_open(str(f), framework="pt") as fh:  # written by BackgroundIndex.save
                        out[n] = fh.get_tensor("df")
                        batches = int(fh.metadata()["num_batches"])
                except (SafetensorError, KeyError, TypeError, ValueError) as e:  # damaged, or not a df file
                    raise PatchError(f"{f} is not a readable background df ({reason(e)}): rebuild it with "
                                     f"mode=background_index") from None
            return out, batches
    raise FileNotFoundError(f"{folder} holds no background df of {layers} (looked in ./, df/ and background_df/): "
                            "pass a checkpoint step folder or an exported Hugging Face folder")


def plot(patch: Patch, out: str | Path) -> Path:
    """A PNG: for each memory layer, the rows (y) each step (x) wrote, coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(patch.layers), 1, figsize=(8, 3 * len(patch.layers)), squeeze=False)
    for ax, n in zip(axes[:, 0], patch.layers):
        for s in patch.steps:
            ids = s.layers[n].ids
            ax.scatter([s.step] * ids.numel(), ids.tolist(), s=4, c=[f"C{(s.groups or [0])[0] % 10}"])
        ax.set_xlabel("step")
        ax.set_ylabel(f"{n} row")
        ax.set_ylim(0, patch.meta["num_rows"])
        ax.set_title(f"rows written per step ({n}; colour: group)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
