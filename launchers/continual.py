"""The continual-learning benchmark and CPU demo (thin: the driver is smft_dist.continual.benchmark).

    python launchers/continual.py --config configs/demo/cpu.yaml --out runs/demo [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from smft_dist.continual.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
