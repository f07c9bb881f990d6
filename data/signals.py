"""The signals a scheduler sends every process of a job before it ends it: SIGTERM (scancel, the end of a
preemption's grace time), the time-limit warning (USR1 or USR2, as `--signal` names it) and SIGHUP (a lost terminal).
The process that owns the work answers them, by checkpointing or requeueing; its helper processes ignore them, so
that none dies of one first and takes the work down before it could stop cleanly."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def ignore_stop_signals() -> None:
    """For a helper process (a decoding or loading worker): leave stop signals to the process that owns the work."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
