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
from trainer.layout import ATTEMPTS, COMPLETE, CONFIG, METRICS, PROBE_RESULTS, latest_complete

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
    "NOT_QUEUED": "ended",
}
# States under which a job may still write into its run directory.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED"}
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
    if not (run_dir / CONFIG).is_file() and not (run_dir / ATTEMPTS).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {CONFIG} or {ATTEMPTS})")
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
    return slurm_state(job.job_id) or "UNKNOWN"


def slurm_state(job_id: str) -> str | None:
    """SLURM's state word for a job: from the queue, or from accounting once it left the queue (NOT_QUEUED when
    accounting does not know it either); None when the scheduler did not answer."""
    queued = _command(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"])
    if queued is None:
        return None
    if queued.stdout.strip():
        return queued.stdout.split()[0]
    if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
        return None  # the controller is down or unreachable: the job may well be running
    accounted = _command(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id, "-o", "State"])
    records = accounted.stdout.split("\n") if accounted is not None and accounted.returncode == 0 else []
    states = [record.split()[0] for record in records if record.strip()]  # "CANCELLED by 1000" -> CANCELLED
    return states[-1] if states else "NOT_QUEUED"  # the newest record


def _local_state(job: attempts.JobHistory) -> str:
    """A local job is the submitit controller process whose PID is the job id."""
    if process_alive(int(job.job_id)):
        return "RUNNING"
    last = job.attempts[-1] if job.attempts else None
    if last is None or last.reason is None:
        return "FAILED"  # ended without a word: killed
    if last.reason == "done":
        return "COMPLETED"
    return "CANCELLED" if last.reason.startswith("stopped") else "FAILED"


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` of this machine is alive (not a zombie); with `started` (`process_started`), whether it
    is still the same process, not a later one that was given the same number."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc to say more
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def process_started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat's 22nd field); None without /proc."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _command(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    """The command's result; None when it is not installed or did not answer within 30 s."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)  # noqa: S603 - fixed argv
    except subprocess.TimeoutExpired:
        return None


def _job_cell(job: attempts.JobHistory | None) -> str:
    if job is None:
        return "-"
    restarts = max((attempt.restart for attempt in job.attempts), default=0)
    return f"{job.job_id} (restart {restarts})" if restarts else job.job_id


def _target(run_dir: Path) -> int | None:
    from omegaconf import OmegaConf

    config = run_dir / CONFIG
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
    age = time.time() - (folder / COMPLETE).stat().st_mtime
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
