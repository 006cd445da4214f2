"""Continual learning over a stream of chunks (thin: the driver is smft_dist.continual.stream).

    torchrun --nproc_per_node 2 launchers/stream.py --config CFG --out OUT --chunk A --chunk B [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from smft_dist.continual.stream import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
