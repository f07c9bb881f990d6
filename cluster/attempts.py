"""The run directory's record of its jobs: `attempts.jsonl`, one line per event, appended by the launcher and rank 0.

    {"event": "submitted", "job_id": "55608752", "executor": "slurm", ...}   music2vec launch, before the job starts
    {"event": "started", "job_id": "55608752", "restart": 0, "step": 0, ...}  each attempt, once its ranks are up
    {"event": "ended", "job_id": "55608752", "restart": 0, "step": 40, "reason": "requeue (SIGUSR2)", ...}

An attempt killed without warning (a node lost, SIGKILL) has a "started" line and no "ended" one; the run resumes
from its last COMPLETE checkpoint all the same.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE = "attempts.jsonl"


def record(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event; a single write of one line, so a reader never sees half of it."""
    line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / FILE).open("a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
