"""Metrics: JSONL (always), TensorBoard (optional), a tqdm bar on rank 0."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricLogger:
    """`log(step, metrics)` appends one JSON line (rank 0) and updates the progress bar."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, every: int = 1,
                 tensorboard: bool = False, progress: bool = True, desc: str = "train"):
        self.enabled, self.every = enabled, max(1, every)
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._t0 = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if "loss" in metrics:
                self._bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if step % self.every:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        for h in (self._bar, self._tb, self._file):
            if h is not None:
                h.close()
