"""Benchmark: what the knowledge-patch ledger costs a sparse-memory finetune step.

    python -m smft_dist.bench.ledger --world 2 --json benchmarks/results/ledger.json

The step of `smft_dist.bench.finetune_step` (same dense model and memory layer builders: forward
with the sparse all-to-all lookup, TF-IDF top-t, backward of the selected rows, MaskedSGD) at the
paper's t = 500 and value_dim = 1024 with bf16 values, run in turn without the ledger, with it at
its default durability (`ledger.fsync=checkpoint`: records handed to the background writer, fsynced
at checkpoints) and with `ledger.fsync=step` (the writer also fsyncs every record), steps
alternating so that all three see the same machine load. Before each step every writer is waited
for, outside the timing, so no step runs beside another mode's writer.

Reports per mode the median step time (max over ranks), the ledger's time on the training thread
(the batch hash, the row captures and the hand-over, timed inside the step: what the step waits
for) and its share of the step without the ledger, the writer thread's time per record
(serialise, write, fsync: it runs beside the next step, on a GPU node while the GPU computes), the
paired whole-step difference, the ledger bytes per step (all ranks) and, for the default mode, the
time of the checkpoint's `sync()` over every step's records (the fsync a checkpoint waits for).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from smft_dist.bench.finetune_step import _add_variant, _dense_model, _step, _summarise, add_step_args
from smft_dist.bench import write_results
from smft_dist.distributed.spawn import run_ranks
from smft_dist.patch.ledger import Ledger

MODES = ("off", "ledger", "ledger_fsync")
FSYNC = {"ledger": "checkpoint", "ledger_fsync": "step"}  # ledger.fsync of each ledger mode


class _LedgeredOptimizer:
    """The memory optimizer with the trainer's ledger hook around its step; times the hook's own
    work on the training thread (capture the rows before, capture after, hand the record to the
    writer) apart from the update."""

    def __init__(self, opt, ledger: Ledger, tables):
        self.opt, self.ledger, self.tables = opt, ledger, tables
        self.ledger_s: list[float] = []

    def step(self, selected):
        t0 = time.perf_counter()
        recording = self.ledger.recording(self.tables, selected)
        recording.__enter__()
        t1 = time.perf_counter()
        n = self.opt.step(selected)
        t2 = time.perf_counter()
        recording.__exit__(None, None, None)
        self.ledger_s.append(t1 - t0 + time.perf_counter() - t2)
        return n


def _rank_body(rank: int, world: int, args, root: str) -> dict:
    from smft_dist.config import DistConfig
    from smft_dist.distributed import init_distributed

    ctx = init_distributed(DistConfig(timeout_s=1200))
    model = _dense_model(args, ctx)
    g = torch.Generator().manual_seed(1000 + rank)
    batch = lambda: torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(ctx.device)  # noqa: E731
    background = [batch() for _ in range(args.background)]
    x = batch()
    v = _add_variant(model, ctx, args, args.slots, 0, background)
    for t in v.tables:  # the paper's bf16 storage: t x D x 2 B per direction (MaskedSGD updates in fp32)
        t.weight.data = t.weight.data.to(torch.bfloat16)
    plain = v.opt
    ledgers = {mode: Ledger.open(os.path.join(root, mode), rank=rank, world_size=world, names=["layer"],
                                 meta={"benchmark": True}, fsync=FSYNC[mode]) for mode in MODES[1:]}
    sel_cfg = argparse.Namespace(top_t=args.top_t, mode="tfidf")
    hooked = {mode: _LedgeredOptimizer(plain, ledgers[mode], v.tables) for mode in ledgers}
    times = {mode: [] for mode in MODES}
    for step in range(args.warmup + args.steps):
        for mode in MODES:
            for ledger in ledgers.values():
                ledger.wait()
            v.opt = hooked.get(mode, plain)
            t0 = time.perf_counter()
            if mode in ledgers:
                ledgers[mode].begin_step({"input_ids": x})  # the batch hash, as in Trainer.train_step
            begin_s = time.perf_counter() - t0
            _step(model, v, x, sel_cfg, args, record=step >= args.warmup)
            if step >= args.warmup:
                row = v.rows.pop()
                if mode in ledgers:
                    row["ledger"] = begin_s + hooked[mode].ledger_s[-1]
                    row["step"] += begin_s
                times[mode].append(row)
    t0 = time.perf_counter()
    ledgers["ledger"].sync()  # what a checkpoint after these steps waits for
    sync_s = time.perf_counter() - t0
    for ledger in ledgers.values():
        ledger.close()
    dist.barrier()
    return {"times": times, "bytes": {m: ledgers[m].bytes_written for m in ledgers},
            "write_s": {m: ledgers[m].write_s for m in ledgers}, "sync_s": sync_s,
            "selected": times["off"][0]["selected"] if times["off"] else 0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=65536, help="memory slots (a square); the ledger does not depend on it")
    add_step_args(p, value_dim=1024)
    p.add_argument("--dir", default=None, help="where the ledgers are written (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        ranks = run_ranks(_rank_body, args.world, args, root, timeout=3600, backend=backend, pg_timeout_s=1200,
                          threads=args.threads)
    results = {}
    off_med, off_worst = _summarise([r["times"]["off"] for r in ranks])
    for mode in MODES:
        med, worst = _summarise([r["times"][mode] for r in ranks])
        res = {"median_step_s": med["step"], "median_update_s": med["update"]}
        if mode != "off":
            # the ledger's training-thread time (slowest rank) over the step without it: the figure to quote;
            # the paired whole-step difference beside it is dominated by CPU noise on a shared machine
            res["median_ledger_s"] = med["ledger"]
            res["ledger_share_of_step"] = med["ledger"] / off_med["step"]
            res["paired_step_difference"] = statistics.median(
                (a - b) / b for a, b in zip(worst["step"], off_worst["step"]))
            res["bytes_per_step"] = sum(r["bytes"][mode] for r in ranks) / (args.warmup + args.steps)
            res["writer_s_per_step"] = max(r["write_s"][mode] for r in ranks) / (args.warmup + args.steps)
            res["fsync"] = FSYNC[mode]
        results[mode] = res
    # the slowest rank's fsync of all steps' records at once: a checkpoint every `steps` steps
    results["ledger"]["checkpoint_sync_s"] = max(r["sync_s"] for r in ranks)
    results["ledger"]["steps_per_checkpoint_sync"] = args.warmup + args.steps
    t, d = ranks[0]["selected"], args.value_dim
    print(json.dumps(results, indent=1), flush=True)
    write_results(args.json, "ledger", args, results, rows_selected_per_step=t,
                  values_bytes_per_step_lower_bound=2 * t * d * 2, time=time.strftime("%Y-%m-%d %H:%M:%S"))


if __name__ == "__main__":
    main()
