"""Entry point for every launch path (thin: the loop lives in smft_dist.train.loop).

    python launchers/train.py --config configs/tiny/pretrain.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/train.py --config ...
    deepspeed --num_gpus 2 launchers/train.py --config ... dist.engine=deepspeed
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from smft_dist.train.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
