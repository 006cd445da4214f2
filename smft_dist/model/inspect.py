"""`smft-inspect`: build a model on the meta device and print its shapes and parameter counts.

    smft-inspect --config configs/model/smft_1p3b.yaml --mp 8 --json
    smft-inspect --config configs/paper/pretrain_1p3b.yaml --plan --mp 8     # bytes per GPU
    smft-inspect --config configs/paper/pretrain_1p3b.yaml --plan --mp 8 --memory-optimizer rowwise_adagrad
    smft-inspect --config configs/paper/pretrain_1p3b.yaml --plan --mp 8 --memory-offload host  # + host per node

No memory is allocated, so the 1.3B paper model is checked on a laptop (or CI). `--plan` adds the
per-GPU memory of a run (smft_dist.model.memory_plan) at the config's settings, each overridable,
and a verdict against `--gpu-memory` (default 80 GB): "fits" when the plan leaves the ~10% that
it does not count (CUDA context, allocator fragmentation), else "does not fit".
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from smft_dist.config import load_config
from smft_dist.errors import console_script
from smft_dist.memory.values import DTYPES
from smft_dist.model import SmftConfig, SmftForCausalLM


def inspect_model(model_cfg, mp: int = 1) -> dict:
    config = SmftConfig.from_model_config(model_cfg)
    with torch.device("meta"):
        model = SmftForCausalLM(config)
    value_ids = {id(layer.values.weight) for layer in model.memory_layers()}
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    memory_values = sum(p.numel() for p in params if id(p) in value_ids)
    slots = config.memory_slots
    rows_per_rank = math.ceil(slots / mp)
    elem = torch.empty(0, dtype=DTYPES[config.memory_value_dtype]).element_size()
    return {
        "total_params": total,
        "dense_params": total - memory_values,
        "memory_value_params": memory_values,
        "memory_slots": slots,
        "memory_layers": list(config.memory_layers),
        "knn": config.memory_knn,
        "heads": config.memory_heads,
        "k_dim": config.memory_k_dim,
        "value_dim": config.memory_value_dim,
        "value_dtype": config.memory_value_dtype,
        "mp": mp,
        "value_rows_per_rank": rows_per_rank,
        "value_bytes_per_rank": rows_per_rank * config.memory_value_dim * elem * len(config.memory_layers),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }


HEADROOM = 0.10  # of the GPU's memory, for what the plan does not count (memory_plan's docstring)


def verdict(plan: dict, gpu_memory_gb: float) -> str:
    """One line: whether the plan fits a GPU of `gpu_memory_gb` GB with HEADROOM left."""
    fits = plan["total_bytes"] <= (1 - HEADROOM) * gpu_memory_gb * 1e9
    return (f"{'fits' if fits else 'does not fit'}: {plan['total_gb']:.2f} GB of {gpu_memory_gb:g} GB per GPU "
            f"({HEADROOM:.0%} of it kept for the CUDA context and fragmentation, which the plan does not count)")


def engine_note(plan: dict, engine: str) -> str | None:
    """Why the plan's engine is not the config's dist.engine (the dense weights then are whole on
    every GPU), or None."""
    s = plan["settings"]
    if s["engine"] == engine:
        return None
    if not s["trainable_dense_params"]:
        return (f"engine none, dense weights whole on every GPU: this run trains no dense weight, so it runs the "
                f"plain engine whatever dist.engine ({engine}) says; there is nothing for ZeRO or FSDP to "
                f"reduce, shard or step")
    return f"engine none: dist.engine {engine} on one GPU has nothing to shard over, so the run uses the plain engine"


@console_script
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML with a `model:` section (e.g. configs/model/smft_1p3b.yaml)")
    p.add_argument("--mp", type=int, default=1, help="memory-parallel ranks the table is sharded over")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("--plan", action="store_true", help="add the per-GPU memory plan of the run")
    p.add_argument("--world", type=int, default=None, help="GPUs (default: mp x dist.dp_replicate)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the config's")
    p.add_argument("--engine", choices=["none", "deepspeed", "fsdp2"], default=None, help="default: the config's")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=None, help="default: the config's")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per GPU (default: data.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute the decoder blocks in backward (default: model.activation_checkpointing)")
    p.add_argument("--memory-optimizer", choices=["adamw", "rowwise_adagrad", "adam_rowwise"], default=None,
                   help="optimizer of memory values trained densely, pretrain/full finetuning (default: the "
                        "config's optim.memory_row_optimizer; docs/plan.md: its state bytes)")
    p.add_argument("--memory-offload", choices=["none", "host"], default=None,
                   help="where the memory shard and its optimizer state live (default: the config's "
                        "model.memory_offload; docs/offload.md)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of one node, for --plan's host memory per "
                                                                "node (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB of one GPU, for --plan's verdict (default 80)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    for flag in ("mp", "world", "micro_batch", "seq_len", "gpus_per_node"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.gpu_memory <= 0:
        p.error("--gpu-memory must be > 0 (GB of one GPU)")
    flags = {"precision": args.precision, "dist.engine": args.engine, "dist.zero_stage": args.zero_stage,
             "data.batch_size": args.micro_batch, "data.seq_len": args.seq_len,
             "model.activation_checkpointing": args.activation_checkpointing,
             "optim.memory_row_optimizer": args.memory_optimizer, "model.memory_offload": args.memory_offload}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    cfg = load_config(args.config, overrides)
    info = inspect_model(cfg.model, args.mp)
    if args.plan:
        from smft_dist.model.memory_plan import memory_plan

        plan = memory_plan(cfg, args.world or args.mp * cfg.dist.dp_replicate, args.mp, args.gpus_per_node)
        info["plan"] = dict(plan, gpu_memory_gb=args.gpu_memory, verdict=verdict(plan, args.gpu_memory),
                            engine_note=engine_note(plan, cfg.dist.engine))
    if args.json:
        print(json.dumps(info))
        return 0
    plan = info.pop("plan", None)
    for k, v in info.items():
        print(f"{k:>22}: {v:,}" if isinstance(v, int) else f"{k:>22}: {v}")
    if plan:
        print("\nper-GPU memory plan (" + ", ".join(f"{k} {v}" for k, v in plan["settings"].items()) + ")")
        for k, v in plan["parts"].items():
            print(f"{k:>22}: {v / 1e9:8.2f} GB")
        print(f"{'total':>22}: {plan['total_gb']:8.2f} GB   (docs/plan.md: what each part counts)")
        if plan["host_parts"]:
            print("\nhost memory per GPU's process (model.memory_offload=host, docs/offload.md)")
            for k, v in plan["host_parts"].items():
                print(f"{k:>22}: {v / 1e9:8.2f} GB")
            print(f"{'per node':>22}: {plan['host_gb_per_node']:8.2f} GB   "
                  f"({min(plan['settings']['gpus_per_node'], plan['settings']['world'])} GPUs)")
        if plan["engine_note"]:
            print(plan["engine_note"])
        print(plan["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
