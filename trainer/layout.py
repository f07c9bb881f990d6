"""The run directory's layout: every name in it, and which checkpoints are complete. The trainer, the probes, the
launcher and `music2vec status` all find their files here. Paths only, no torch: the status table reads this for
many runs at once.

    RUN_DIR/
      config.yaml                  the resolved experiment config
      ds_config.json               the resolved DeepSpeed config
      metrics.jsonl                a line per optimizer update (rank 0)
      attempts.jsonl               a line per job event: submitted, started, ended
      leases/                      who writes into the run directory now (cluster.lease)
      checkpoints/step_N/          resumable; COMPLETE written last
      exports/step_N/              the Hugging Face model of that checkpoint
      tb/                          TensorBoard: training and probe scalars
      jobs/                        the training jobs' logs, one folder per job
      probes/                      results.jsonl, report.md, report.png, features' progress, the nightly jobs' logs,
                                   random_init/step_000000000/ (the model before its first update, a reference)
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
ATTEMPTS = "attempts.jsonl"
LEASES = "leases"
CHECKPOINTS = "checkpoints"
EXPORTS = "exports"
TENSORBOARD = "tb"
JOBS = "jobs"
PROBES = "probes"
PROBE_RESULTS = Path(PROBES) / "results.jsonl"  # a line per (checkpoint, task, seed, metric)
PROBE_REPORT = Path(PROBES) / "report.md"  # and report.png beside it
PROBE_JOBS = Path(PROBES) / JOBS
NIGHTLY_LOCK = Path(PROBES) / "nightly.lock"
PROBE_RANDOM_INIT = Path(PROBES) / "random_init"
COMPLETE = "COMPLETE"  # written last, fsynced: a checkpoint folder without it does not exist
_STEP_DIR = re.compile(r"step_(\d{9})")


def tag(step: int) -> str:
    """The folder name of a step's checkpoint and export."""
    return f"step_{step:09d}"


def step_of(folder: Path) -> int | None:
    """The step of a checkpoints/step_N or exports/step_N folder; None for any other name."""
    match = _STEP_DIR.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / tag(step)


def export_folder(run_dir: Path, step: int) -> Path:
    return run_dir / EXPORTS / tag(step)


def export_of(checkpoint: Path) -> Path | None:
    """The export beside a run's checkpoints/step_N (whether or not it exists); None for any other folder."""
    if checkpoint.parent.name != CHECKPOINTS or step_of(checkpoint) is None:
        return None
    return checkpoint.parent.parent / EXPORTS / checkpoint.name


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for folder in (run_dir / CHECKPOINTS).glob("step_*"):
        step = step_of(folder)
        if step is not None and (folder / COMPLETE).is_file():
            found.append((step, folder))
    return sorted(found)


def latest_complete(run_dir: Path) -> tuple[int, Path] | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
