"""Metrics: JSONL (always), TensorBoard (optional), progress on rank 0: a tqdm bar on a terminal,
a periodic log line otherwise (a Slurm `.out` file would get one line rewritten with carriage
returns thousands of times)."""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, TextIO

import torch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class MetricLogger:
    """`log(step, metrics)` appends one JSON line (rank 0) and shows progress: a tqdm bar when
    `stream` (default stdout) is a terminal, else one line per `progress_every_s` seconds (and at
    the first and last step), e.g. `finetune/sparse_memory step 120/1000 (12%) loss 3.2104
    lr 1.0e-03 tokens/s 5300.0 elapsed 0:01:23 eta 0:09:45`."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, every: int = 1,
                 tensorboard: bool = False, progress: bool = True, desc: str = "train",
                 progress_every_s: float = 30.0, stream: Optional[TextIO] = None):
        self.enabled, self.every = enabled, max(1, every)
        self._file = self._tb = self._bar = None
        self._lines = False  # periodic progress lines instead of the bar
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        self._stream = stream if stream is not None else sys.stdout
        self._progress, self._desc, self._total = progress, desc, total_steps
        if progress and self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, file=self._stream)
        elif progress:
            self._lines = True
            self._start_step = start_step
            self._every_s, self._last_line = progress_every_s, None
        self._t0 = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if "loss" in metrics:
                self._bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if self._lines:
            self._progress_line(step, metrics)
        if step % self.every == 0 or any(k.startswith("eval/") for k in metrics):
            self.write(step, metrics)

    def write(self, step: int, metrics: dict) -> None:
        """The JSONL record (and TensorBoard scalars) of `step`, without the step's progress (e.g.
        step 0's eval); evaluation scores are also printed, one line whatever the interval, e.g.
        `finetune/sparse_memory eval step 40/1000: qa_f1/known_qa 0.4120 qa_em/known_qa 0.3000`."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        scores = [f"{k[len('eval/'):]} {v:.4f}" for k, v in metrics.items() if k.startswith("eval/")]
        if self._progress and scores:
            line = f"{self._desc} eval step {step}/{self._total}: {' '.join(scores)}"
            if self._bar is not None:
                self._bar.write(line, file=self._stream)  # above the bar, which stays at the bottom
            else:
                print(line, file=self._stream, flush=True)

    def _progress_line(self, step: int, metrics: dict) -> None:
        now = time.time()
        due = self._last_line is None or now - self._last_line >= self._every_s or step >= self._total
        if not due:
            return
        self._last_line = now
        elapsed = now - self._t0
        done = step - self._start_step  # steps of this run (a resumed run starts past 0)
        parts = [f"{self._desc} step {step}/{self._total} ({100 * step // max(1, self._total)}%)"]
        for key, fmt in (("loss", ".4f"), ("lr", ".1e"), ("tokens_per_s", ".1f")):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(f"{key.replace('_per_', '/')} {metrics[key]:{fmt}}")
        parts.append(f"elapsed {_hms(elapsed)}")
        if 0 < done and step < self._total:
            parts.append(f"eta {_hms(elapsed / done * (self._total - step))}")
        print(" ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        for h in (self._bar, self._tb, self._file):
            if h is not None:
                h.close()
