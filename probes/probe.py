"""Probe one checkpoint on some tasks: features (cached), a head per seed, song-level test scores as rows."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probes.datasets import demo, emomusic, giantsteps, gtzan, magnatagatune
from probes.features import model_folder, task_features
from probes.head import HeadConfig, train_probe
from probes.tasks import Example, Task

# task name -> (task, the adapter that lists its examples under a data root)
REGISTRY: dict[str, tuple[Task, Callable[[Task, Path], list[Example]]]] = {
    name: (task, dataset.examples)
    for dataset in (demo, magnatagatune, gtzan, giantsteps, emomusic)
    for name, task in dataset.TASKS.items()
}


def task_names() -> list[str]:
    return sorted(REGISTRY)


def checkpoint_step(checkpoint: Path) -> int | None:
    """The training step of a run's checkpoints/step_N or exports/step_N; None for a foreign model."""
    match = re.fullmatch(r"step_(\d+)", Path(checkpoint).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ProbeSettings:
    """Where the datasets and cached features are, and how heads are trained: the same for every checkpoint."""

    data_root: Path
    seeds: tuple[int, ...] = (0,)  # one head per seed; results report mean ± std
    cache: Path | None = None  # None: ~/.cache/music2vec/features
    head: HeadConfig = field(default_factory=HeadConfig)
    progress: bool = True


def probe(checkpoint: Path, tasks: list[str], settings: ProbeSettings) -> list[dict[str, Any]]:
    """One row per (task, seed, metric) on the test split, in the order of `tasks` and `settings.seeds`."""
    unknown = sorted(set(tasks) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown probe task(s) {unknown}; known: {task_names()}")
    head = settings.head
    folder = model_folder(checkpoint)
    rows = []
    for name in tasks:
        task, adapter = REGISTRY[name]
        examples = adapter(task, Path(settings.data_root))
        features = task_features(folder, task, examples, cache=settings.cache, progress=settings.progress)
        for seed in settings.seeds:
            result = train_probe(task, examples, features, seed=seed, cfg=head)
            for metric, value in result.test.items():
                rows.append(
                    {
                        "checkpoint": str(checkpoint),
                        "step": checkpoint_step(checkpoint),
                        "task": name,
                        "metric": metric,
                        "value": value,
                        "primary": metric == task.monitor,
                        "seed": seed,
                        "head": asdict(head) | {"lr": head.lr or task.lr, "epochs": result.epochs},
                        "valid": result.valid[metric],
                        "time": time.time(),
                    }
                )
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """task, metric, mean ± std over seeds (and how many seeds), primary metrics first."""
    groups: dict[tuple[str, str], list[float]] = {}
    primary: dict[tuple[str, str], bool] = {}
    for row in rows:
        key = (row["task"], row["metric"])
        groups.setdefault(key, []).append(row["value"])
        primary[key] = row["primary"]
    lines = ["task                 metric               test (mean ± std over seeds)"]
    for (task, metric), values in sorted(groups.items(), key=lambda item: (item[0][0], not primary[item[0]])):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{task:<20} {metric:<20} {statistics.mean(values):.4f} ± {spread:.4f} (n={len(values)})")
    return "\n".join(lines) + "\n"
