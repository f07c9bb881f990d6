"""The run directory's record of its jobs: `attempts.jsonl`, one line per event, appended by the launcher and rank 0.

    {"event": "submitted", "job_id": "55608752", "executor": "slurm", ...}   music2vec launch, before the job starts
    {"event": "started", "job_id": "55608752", "restart": 0, "step": 0, ...}  each attempt, once its ranks are up
    {"event": "ended", "job_id": "55608752", "restart": 0, "step": 40, "reason": "requeue (SIGUSR2)", ...}

An attempt killed without warning (a node lost, SIGKILL) has a "started" line and no "ended" one; the run resumes
from its last COMPLETE checkpoint all the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import jsonlines
from trainer.layout import ATTEMPTS


def record(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event."""
    jsonlines.append(run_dir / ATTEMPTS, [{"event": event, "time": time.time(), **fields}])


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    return jsonlines.read(run_dir / ATTEMPTS)


@dataclass
class Attempt:
    job_id: str
    restart: int
    start_step: int | None = None
    end_step: int | None = None
    reason: str | None = None  # None: still running, or killed without a chance to say so
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobHistory:
    job_id: str
    executor: str
    attempts: list[Attempt]


def latest_job(run_dir: Path) -> JobHistory | None:
    """The newest job submitted for this run directory, with its attempts in order."""
    events = read_events(run_dir)
    submitted = [event for event in events if event["event"] == "submitted"]
    if not submitted:
        return None
    job_id = submitted[-1]["job_id"]
    attempts: dict[int, Attempt] = {}
    for event in events:
        if event.get("job_id") != job_id or event["event"] == "submitted":
            continue
        attempt = attempts.setdefault(event["restart"], Attempt(job_id, event["restart"]))
        if event["event"] == "started":
            attempt.start_step, attempt.details = event["step"], event
        elif event["event"] == "ended":
            attempt.end_step, attempt.reason = event["step"], event["reason"]
    return JobHistory(job_id, submitted[-1]["executor"], [attempts[key] for key in sorted(attempts)])
