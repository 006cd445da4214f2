"""Benchmarks that write JSON figures (``python -m smft_dist.bench.<name> --json OUT``)."""
from __future__ import annotations

import json
import os


def write_results(path: str | None, benchmark: str, args, results: list, **extra) -> dict:
    """The benchmark's record (its name, arguments, torch build, device, CPU count, `extra` fields
    and `results`), written as JSON to `path` when one is given -> the record."""
    import torch

    out = {"benchmark": benchmark, "config": vars(args), "torch": torch.__version__,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(), **extra,
           "results": results}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    return out
