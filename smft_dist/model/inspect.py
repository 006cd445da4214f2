"""`smft-inspect`: build a model on the meta device and print its shapes and parameter counts.

    smft-inspect --config configs/model/smft_1p3b.yaml --mp 8 --json

No memory is allocated, so the 1.3B paper model is checked on a laptop (or CI).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from smft_dist.config import ConfigError, load_config
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML with a `model:` section (e.g. configs/model/smft_1p3b.yaml)")
    p.add_argument("--mp", type=int, default=1, help="memory-parallel ranks the table is sharded over")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.mp < 1:
        p.error("--mp must be >= 1")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = inspect_model(cfg.model, args.mp)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v:,}" if isinstance(v, int) else f"{k:>22}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
