"""Where fact learning stops at CPU scale (docs/design.md §5.1): each new fact's F1 right after
its own step(s) against all facts' F1 at the end of the stream, and what several steps per fact do.

    python -m smft_dist.bench.fact_recall --config configs/demo/cpu.yaml --run runs/demo \\
        --method sparse --setting "optim.memory_lr=10000 selection.top_t=100" --steps-per-fact 3 \\
        --json recall.json

Runs the demo's stream (its benchmark's fact order) from a finished demo run's pretrained model and
df index. `--steps-per-fact 1` is the paper's protocol; more repeats the step on the same batch
(the sparse selection recomputed each time), which is outside the protocol: a diagnostic of whether
one step, rather than the memory, limits learning. Writes {immediate_f1, end_f1, known_f1_end, ...}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

METHODS = {"sparse": ("sparse_memory", ["optim.memory_optimizer=sgd", "selection.mode=tfidf"]),
           "full": ("full", ["optim.weight_decay=0.1"])}


def main(argv=None) -> int:
    from smft_dist.continual.benchmark import MethodSweep, finetune_config, load_bench, load_continual_config, seed_dir
    from smft_dist.distributed import init_distributed
    from smft_dist.eval.qa import evaluate_qa
    from smft_dist.train.trainer import build_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the continual config the run was made with")
    p.add_argument("--run", required=True, help="a finished continual run folder (data, seed<s>/background_index)")
    p.add_argument("--seed", type=int, default=0, help="its pretraining seed to start from")
    p.add_argument("--method", choices=sorted(METHODS), default="sparse")
    p.add_argument("--setting", required=True, help='key=value pairs, e.g. "optim.memory_lr=10000 selection.top_t=100"')
    p.add_argument("--steps-per-fact", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.steps_per_fact < 1:
        p.error(f"--steps-per-fact {args.steps_per_fact} must be >= 1")
    torch.manual_seed(0)
    c = load_continual_config(args.config)
    run = Path(args.run)
    method, overrides = METHODS[args.method]
    m = MethodSweep(name=args.method, method=method, overrides=overrides)
    trainer = build_run(finetune_config(c, "facts", m, args.setting, seed_dir(run, args.seed)), init_distributed(c.run.dist))
    bench = load_bench(c, run / "data")
    facts = bench.tasks["facts"]
    model = trainer.wrapped if trainer.wrapped is not None else trainer.model
    f1 = lambda pairs: evaluate_qa(model, bench.tokenizer, pairs, c.eval.qa_batch_size,  # noqa: E731
                                   c.eval.max_new_tokens)["f1"]
    immediate = []
    for i, batch in enumerate(facts.batches):
        for _ in range(args.steps_per_fact):
            trainer.train_step(batch)
        immediate.append(f1(facts.qa_per_step[i]))
    out = {"run": str(run), "method": args.method, "setting": args.setting, "steps_per_fact": args.steps_per_fact,
           "immediate_f1": sum(immediate) / len(immediate), "end_f1": f1(facts.learned_qa()),
           "known_f1_end": f1(bench.known_qa)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
