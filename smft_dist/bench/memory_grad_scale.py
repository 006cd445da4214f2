"""Why masked SGD needs lr ~1e4 on the CPU demo (docs/design.md §5.2): measure the terms of a
selected row's gradient during sparse memory finetuning.

    python -m smft_dist.bench.memory_grad_scale --config configs/demo/cpu.yaml --run runs/demo \\
        --json benchmarks/results/memory_grad_scale.json

With the loss the mean over the T label tokens of the batch, row i's gradient is

    g_i = (1/T) sum_{t, h, k: slot_thk = i} w_thk u_t,      u_t = dL_t/dy_t  (D-vector)
        = (m_i / T) ubar_i,    m_i = sum of the softmax weights row i receives in the batch,
                               ubar_i = the weight-averaged u_t of the tokens that read it,

so one SGD step moves the row by lr * (m_i / T) * |ubar_i|. This script runs the demo protocol
(one step per fact, sparse memory finetuning, the given t and lr) on the first `--facts` facts of
a finished demo run (its pretrained model and df index) and records, per step and averaged over
the selected rows: T, m_i, the number of tokens reading the row, |ubar_i|, the mean per-token
|u_t|, |V_i| before the step, |g_i| (checked against the table's own row gradient) and the
relative move lr |g_i| / |V_i|. Shapes: T label tokens, K heads x knn accesses per token, D value dim.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def _capture(table, store: dict):
    """Wrap `table.embedding_bag` to keep this step's slots_TK, weights_TK and dL/dy_TD."""
    original = table.embedding_bag

    def embedding_bag(idx_TK, w_TK, **kwargs):
        y_TD = original(idx_TK, w_TK, **kwargs)
        store.update(idx=idx_TK.detach(), w=w_TK.detach().float())
        if y_TD.requires_grad:
            y_TD.register_hook(lambda g: store.__setitem__("dy", g.detach().float()))
        return y_TD

    table.embedding_bag = embedding_bag


def step_terms(store: dict, table, selected: torch.Tensor, v_before: torch.Tensor, n_labels: int, lr: float) -> dict:
    idx, w, dy = store["idx"], store["w"], store["dy"]
    u_TD = dy * n_labels  # per-token gradient dL_t/dy_t (the mean loss divides it by T)
    hit = idx.unsqueeze(-1) == selected.view(1, 1, -1)  # T x K x t
    w_TKt = w.unsqueeze(-1) * hit
    mass_t = w_TKt.sum((0, 1))  # m_i
    tokens_t = hit.any(1).sum(0).float()
    g_tD = torch.einsum("tkr,td->rd", w_TKt, dy)
    rows, grad = table.sparse_grad()
    own = dict(zip((rows + table.row_start).tolist(), grad))
    check = max(float((g_tD[j] - own[int(s)]).abs().max()) for j, s in enumerate(selected.tolist()))
    ubar = (torch.einsum("tkr,td->rd", w_TKt, u_TD).norm(dim=1) / mass_t.clamp_min(1e-12))
    g_norm, v_norm = g_tD.norm(dim=1), v_before.norm(dim=1)
    return {"label_tokens": n_labels, "selected": int(selected.numel()), "mass": float(mass_t.mean()),
            "tokens_reading": float(tokens_t.mean()), "ubar_norm": float(ubar.mean()),
            "token_u_norm": float(u_TD.norm(dim=1).mean()), "row_norm": float(v_norm.mean()),
            "grad_norm": float(g_norm.mean()), "relative_move": float((lr * g_norm / v_norm).mean()),
            "max_abs_diff_vs_table_grad": check}


def main(argv=None) -> int:
    from smft_dist.continual.benchmark import MethodSweep, finetune_config, load_bench, load_continual_config, seed_dir
    from smft_dist.distributed import init_distributed
    from smft_dist.train.trainer import build_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the continual config the run was made with")
    p.add_argument("--run", required=True, help="a finished continual run folder (data, seed<s>/background_index)")
    p.add_argument("--seed", type=int, default=0, help="its pretraining seed to start from")
    p.add_argument("--facts", type=int, default=20)
    p.add_argument("--top-t", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e4)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    c = load_continual_config(args.config)
    run = Path(args.run)
    m = MethodSweep(name="sparse", method="sparse_memory", overrides=["optim.memory_optimizer=sgd", "selection.mode=tfidf"])
    cfg = finetune_config(c, "facts", m, f"optim.memory_lr={args.lr} selection.top_t={args.top_t}",
                          seed_dir(run, args.seed))
    trainer = build_run(cfg, init_distributed(c.run.dist))
    (table,) = trainer.tables
    store: dict = {}
    _capture(table, store)
    bench = load_bench(c, run / "data")
    facts = bench.tasks["facts"]
    from smft_dist.selection import tfidf

    chosen: dict = {}
    select = tfidf.select_for_model

    def remember(*a, **k):
        ids, stats = select(*a, **k)
        chosen["ids"] = ids[0]
        chosen["before"] = table.weight.detach()[ids[0] - table.row_start].float().clone()
        return ids, stats

    import smft_dist.train.trainer as trainer_mod

    trainer_mod.select_for_model = remember
    steps = []
    for batch in facts.batches[:args.facts]:
        n_labels = int((batch["labels"][:, 1:] != -100).sum())
        trainer.train_step(batch)
        steps.append(step_terms(store, table, chosen["ids"], chosen["before"], n_labels, args.lr))
    mean = {k: statistics.fmean(s[k] for s in steps) for k in steps[0]}
    mean["max_abs_diff_vs_table_grad"] = max(s["max_abs_diff_vs_table_grad"] for s in steps)
    mc = c.run.model
    out = {"run": str(run), "lr": args.lr, "top_t": args.top_t, "facts": args.facts,
           "accesses_per_token": mc.memory_heads * mc.memory_knn, "value_dim": mc.memory_value_dim,
           "batch": c.benchmark.paraphrases, "seq_len": c.benchmark.seq_len, "mean": mean, "steps": steps}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: round(v, 6) for k, v in mean.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
