"""Graceful stop: a signal or the launcher sets a flag; the loop checkpoints at the next update boundary and exits.

SLURM sends SIGTERM (or the signal named by `--signal`, often SIGUSR1/SIGUSR2) before a time limit or preemption,
and submitit relays it; SIGHUP comes when a terminal goes away. Ranks may receive a signal at different moments,
so the loop agrees on stopping with an all-reduce before acting (see `should_stop`).
"""

from __future__ import annotations

import signal
from types import FrameType

from data.signals import STOP_SIGNALS


class StopFlag:
    def __init__(self) -> None:
        self.reason: str | None = None  # the first request
        self.signals: set[signal.Signals] = set()  # every signal received, e.g. to tell a requeue from a cancel

    def request(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next update boundary (a launcher calls this directly)."""
        if self.reason is None:
            self.reason = reason

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)

    def uninstall(self) -> None:
        """Ignore stop signals from now on: the run is over and only exits. (Not SIG_DFL: that would kill a process
        still writing its result; a Python handler is also reset to SIG_DFL while the interpreter shuts down.)"""
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)

    def _on_signal(self, number: int, _frame: FrameType | None) -> None:
        self.signals.add(signal.Signals(number))
        self.request(signal.Signals(number).name)

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on every rank)."""
        from trainer.collectives import reduce_scalar  # here: a job installs the flag before torch is imported

        asked = reduce_scalar(float(self.reason is not None)) > 0
        if asked and self.reason is None:
            self.reason = "another rank was asked to stop"
        return asked
