"""Preemption: SIGTERM (Slurm's time limit or `scancel`) and SIGUSR1 (`sbatch --signal=USR1@120`) ask to stop.

The handler only raises a flag; the training loop polls it between steps, agrees with the other
ranks to stop at the same step, checkpoints, writes a `preempted` final record and exits with
`PREEMPTED_EXIT` so that a launcher can requeue the task, which then resumes from the checkpoint.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

#: Exit status of a preempted run (EX_TEMPFAIL: "try again later").
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for `STOP_SIGNALS` while active; `requested` tells which signal arrived, if any."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
