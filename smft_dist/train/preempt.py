"""Preemption: a signal sets a flag; at the next step boundary the ranks agree and save.

Slurm sends SIGUSR1 (``--signal=USR1@120``) or SIGTERM before it kills a job. Saving inside a
signal handler is unsafe (it may interrupt a collective), so the handler only sets a flag and
`requested()` turns the flags of all ranks into one decision with a MAX all-reduce.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the Slurm scripts requeue the job on it


class PreemptionFlag:
    """Context manager: installs the handlers on enter and restores the previous ones on exit, so a
    process that calls `train()` in-process (the continual demo) stays killable afterwards."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signals, self.flag, self.signum = signals, False, None
        self._saved = {}

    def __enter__(self) -> "PreemptionFlag":
        self._saved = {s: signal.signal(s, self._handler) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def _handler(self, signum, _frame):
        self.flag, self.signum = True, signum

    def requested(self, device: torch.device, world_size: int) -> bool:
        if world_size == 1:
            return self.flag
        t = torch.tensor([1 if self.flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
