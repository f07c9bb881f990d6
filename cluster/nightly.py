"""The nightly probe job as a scheduled job: `music2vec nightly RUN_DIR… --executor slurm|local [--every 24h]`.

The job runs `probes.nightly.nightly` on each run directory. With an interval, it submits its own next run before
it probes, with SLURM's `--begin=now+<interval>`: the chain survives a failed night, and the cluster runs the job
every night without cron. Without SLURM, cron is the alternative (docs/PROBES.md has the line).

Everything is checked before anything is queued: the tasks, their datasets, and the run directories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from cluster.config import ClusterConfig
from cluster.submit import check_submittable, log_folder, submit_job
from probes.probe import ProbeSettings, check_protocol, chosen_tasks
from trainer.layout import CONFIG, PROBE_JOBS

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EVERY_NEEDS_SLURM = "--every needs --executor slurm (SLURM's --begin); without SLURM, run nightly from cron"


def interval_seconds(text: str) -> int:
    """'24h', '30m', '90s', '1d' or plain seconds -> seconds."""
    match = re.fullmatch(r"(\d+)\s*([smhd]?)", text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"--every {text!r}: expected a positive interval such as 24h, 30m, 90s or 1d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class NightlySchedule:
    run_dirs: tuple[Path, ...]  # absolute: the job may start in another directory
    tasks: tuple[str, ...]
    settings: ProbeSettings
    cluster: ClusterConfig
    every_s: int | None = None  # None: run once

    @property
    def log_folder(self) -> Path:
        """The first run directory's probes/jobs/<job id>/."""
        return log_folder(self.run_dirs[0] / PROBE_JOBS, self.cluster)


def check_schedule(schedule: NightlySchedule) -> None:
    """What would fail in the job fails here, before anything is queued."""
    if schedule.every_s is not None and schedule.cluster.executor != "slurm":
        raise ValueError(EVERY_NEEDS_SLURM)
    check_submittable(schedule.cluster, option="--executor")
    missing = [str(run_dir) for run_dir in schedule.run_dirs if not (run_dir / CONFIG).is_file()]
    if missing:
        raise FileNotFoundError(f"not run directories (no {CONFIG}): {missing}")
    check_protocol(schedule.settings)
    chosen = chosen_tasks(list(schedule.tasks), schedule.settings.task_files)
    for task, adapter in chosen.values():  # each adapter reads its dataset's annotations and checks every audio file
        adapter(task, schedule.settings.data_root)


class NightlyJob:
    """What the scheduler runs: the next night's job first (if any), then the probes of every run directory."""

    def __init__(self, schedule: NightlySchedule) -> None:
        self.schedule = schedule

    def __call__(self) -> dict[str, Any]:
        from probes.nightly import nightly_runs

        schedule = self.schedule
        following = submit(schedule, delay_s=schedule.every_s) if schedule.every_s else None
        if following is not None:
            print(f"next nightly probe job: {following.job_id}, in {schedule.every_s} s", flush=True)
        new_rows = nightly_runs(list(schedule.run_dirs), list(schedule.tasks), schedule.settings)
        next_job = following.job_id if following else None
        return {"new_rows": {str(run_dir): rows for run_dir, rows in new_rows.items()}, "next_job": next_job}


def submit(schedule: NightlySchedule, *, delay_s: int | None = None) -> submitit.Job:
    """Queue the job (SLURM, starting `delay_s` from now if given) or start it (a local process); never requeued."""
    return submit_job(NightlyJob(schedule), schedule.cluster, schedule.log_folder, max_requeues=0, begin_in_s=delay_s)
