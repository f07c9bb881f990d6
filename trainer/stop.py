"""Graceful stop: a signal or the launcher sets a flag; the loop checkpoints at the next update boundary and exits.

SLURM sends SIGTERM (or the signal named by `--signal`, often SIGUSR1/SIGUSR2) before a time limit or preemption,
and submitit relays it; SIGHUP comes when a terminal goes away. Ranks may receive a signal at different moments,
so the loop agrees on stopping with an all-reduce before acting (see `should_stop`).
"""

from __future__ import annotations

import signal
from types import FrameType

from trainer.collectives import reduce_scalar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


class StopFlag:
    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next update boundary (a launcher calls this directly)."""
        if self.reason is None:
            self.reason = reason

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, _frame: FrameType | None) -> None:
        self.request(signal.Signals(number).name)

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was asked to stop (a collective: call it on every rank)."""
        asked = reduce_scalar(float(self.reason is not None)) > 0
        if asked and self.reason is None:
            self.reason = "another rank was asked to stop"
        return asked
