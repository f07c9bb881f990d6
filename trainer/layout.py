"""Where a run directory keeps its checkpoints, and which of them are complete. Paths only, no torch: the
`music2vec status` table reads this for many runs at once.
"""

from __future__ import annotations

import re
from pathlib import Path

METRICS = "metrics.jsonl"  # a line per optimizer update, written by rank 0
ATTEMPTS = "attempts.jsonl"  # a line per job event: submitted, started, ended
PROBE_RESULTS = Path("probes") / "results.jsonl"  # a line per (checkpoint, task, seed, metric)
LEASES = "leases"  # who writes into the run directory now: the newest of its numbered files (cluster.lease)
COMPLETE = "COMPLETE"  # written last, fsynced: a checkpoint folder without it does not exist
STEP_DIR = re.compile(r"step_(\d{9})")


def tag(step: int) -> str:
    return f"step_{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for folder in (run_dir / "checkpoints").glob("step_*"):
        match = STEP_DIR.fullmatch(folder.name)
        if match and (folder / COMPLETE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_complete(run_dir: Path) -> tuple[int, Path] | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None
