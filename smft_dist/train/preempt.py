"""Preemption: a signal sets a flag; at the next step boundary the ranks agree and save.

Slurm sends SIGUSR1 (``--signal=USR1@120``) or SIGTERM before it kills a job. Saving inside a
signal handler is unsafe (it may interrupt a collective), so the handler only sets a flag. The
trainer sums the flags of all ranks in the step's own all-reduces (no collective of its own):
every rank ends the step with the same decision (`Trainer.preempted`).
"""
from __future__ import annotations

import signal

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
