"""A job entry (ENTRY=tests/slurm/global_batches.py) that reads the training data exactly as the
trainer does and records what each global step holds.

Every rank builds the run's loader (`smft_dist.train.loop.build_loader`, with its start-up checks)
and takes `steps` batches; the ranks all-gather each step's `group` column (one fact's paraphrases
share a group id); rank 0 writes `<out_dir>/global_batches.json`: per step, the sorted distinct
groups of the whole world's batch. Same command line as launchers/train.py.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from smft_dist.config import data_source, load_config  # noqa: E402
from smft_dist.distributed import init_distributed  # noqa: E402
from smft_dist.train.loop import build_loader  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, action="append")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.dist)
    loader = build_loader(cfg, ctx, data_source(cfg)[1])
    batches, steps = iter(loader), []
    for _ in range(cfg.steps):
        groups_B = next(batches)["group"]
        world_WB = groups_B.new_empty(ctx.world_size * groups_B.numel())
        dist.all_gather_into_tensor(world_WB, groups_B)
        steps.append(sorted(set(world_WB.tolist())))
    if ctx.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "global_batches.json").write_text(json.dumps(steps))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
