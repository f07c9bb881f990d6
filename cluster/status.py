"""`music2vec status RUN_DIR…`: one table across runs, read from the run directories and the scheduler.

Everything but the job state comes from files a run writes anyway (config.yaml, metrics.jsonl, checkpoints,
attempts.jsonl, probes/results.jsonl), so the table also works for runs started with `music2vec train`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import attempts
from data import jsonlines
from trainer.layout import ATTEMPTS, METRICS, PROBE_RESULTS, latest_complete

# SLURM's job states, as the one word a person scanning the table needs.
_PLAIN_STATES = {
    "PENDING": "queued",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "REQUEUED": "requeued",
    "REQUEUE_HOLD": "requeued",
    "COMPLETED": "done",
    "CANCELLED": "cancelled",
    "TIMEOUT": "timeout",
    "PREEMPTED": "preempted",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
}
_COLUMNS = ("run", "job", "state", "step", "loss", "audio-s/s", "finishes in", "checkpoint", "probes")


@dataclass
class RunStatus:
    run: str
    job: str
    state: str
    step: str
    loss: str
    rate: str
    eta: str
    checkpoint: str
    probes: str

    def cells(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


def status_table(run_dirs: list[Path]) -> str:
    rows = [_COLUMNS] + [run_status(run_dir).cells() for run_dir in run_dirs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def run_status(run_dir: Path) -> RunStatus:
    if not (run_dir / "config.yaml").is_file() and not (run_dir / ATTEMPTS).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml or {ATTEMPTS})")
    metrics = jsonlines.read(run_dir / METRICS)[-50:]
    target = _target(run_dir)
    step = metrics[-1]["step"] if metrics else 0
    job = attempts.latest_job(run_dir)
    state = plain_state(job)
    return RunStatus(
        run=str(run_dir),
        job=_job_cell(job),
        state=state,
        step=f"{step}/{target}" if target else str(step),
        loss=f"{metrics[-1]['loss']:.4f}" if metrics else "-",
        rate=f"{metrics[-1]['audio_seconds_per_s']:.0f}" if metrics else "-",
        eta=_eta(metrics, step, target) if state == "running" else "-",
        checkpoint=_checkpoint_cell(run_dir),
        probes=_probe_cell(run_dir / PROBE_RESULTS),
    )


def plain_state(job: attempts.JobHistory | None) -> str:
    if job is None:
        return "-"  # never launched: a `music2vec train` run directory
    state = job_state(job)
    plain = _PLAIN_STATES.get(state, state.lower())
    if plain == "queued" and len(job.attempts) > 0:
        return "requeued"  # pending again after an attempt ran
    return plain


def job_state(job: attempts.JobHistory) -> str:
    """SLURM's state word for the job (PENDING, RUNNING, COMPLETED, ...), or UNKNOWN."""
    if job.executor == "local":
        return _local_state(job)
    live = _command(["squeue", "--noheader", "--jobs", job.job_id, "--format", "%T"])
    if live:
        return live.split()[0]
    accounted = _command(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job.job_id, "-o", "State"])
    return accounted.split()[0] if accounted else "UNKNOWN"


def _local_state(job: attempts.JobHistory) -> str:
    """A local job is the submitit controller process whose PID is the job id."""
    if _process_alive(int(job.job_id)):
        return "RUNNING"
    last = job.attempts[-1] if job.attempts else None
    if last is None or last.reason is None:
        return "FAILED"  # ended without a word: killed
    if last.reason == "done":
        return "COMPLETED"
    return "CANCELLED" if last.reason.startswith("stopped") else "FAILED"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.is_file() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def _command(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603 - fixed argv
    return result.stdout.strip() if result.returncode == 0 else ""


def _job_cell(job: attempts.JobHistory | None) -> str:
    if job is None:
        return "-"
    restarts = max((attempt.restart for attempt in job.attempts), default=0)
    return f"{job.job_id} (restart {restarts})" if restarts else job.job_id


def _target(run_dir: Path) -> int | None:
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    return int(OmegaConf.load(config).optim.max_updates) if config.is_file() else None


def _eta(metrics: list[dict[str, float]], step: int, target: int | None) -> str:
    if not metrics or not target:
        return "-"
    seconds_per_update = statistics.median(entry["step_time"] for entry in metrics)
    return duration((target - step) * seconds_per_update)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _checkpoint_cell(run_dir: Path) -> str:
    latest = latest_complete(run_dir)
    if latest is None:
        return "-"
    step, folder = latest
    age = time.time() - (folder / "COMPLETE").stat().st_mtime
    return f"{step} ({duration(age)} ago)"


def _probe_cell(results: Path) -> str:
    """The newest probed step's primary scores, `task/metric=mean over seeds` each."""
    rows = jsonlines.read(results)
    if not rows:
        return "-"
    newest = max(row["step"] for row in rows)
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row["step"] == newest and row.get("primary", True):
            scores.setdefault(f"{row['task']}/{row['metric']}", []).append(row["value"])
    means = {name: statistics.mean(values) for name, values in scores.items()}  # over seeds
    return f"@{newest} " + " ".join(f"{name}={value:.3f}" for name, value in sorted(means.items()))
