"""Probe one checkpoint on some tasks: features (cached), a head per seed (optionally the best of a search, and one
per hidden state), song-level test scores as rows."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from probes.datasets import demo, emomusic, giantsteps, gtzan, magnatagatune
from probes.datasets.files import DatasetError
from probes.datasets.task_file import load_task_file
from probes.features import FeaturePrecision, model_folder, task_features
from probes.head import HeadConfig, best_on_valid, jukemir_grid, lr_sweep
from probes.tasks import Adapter, Protocol, Task
from trainer.layout import step_of

# task name -> (task, its adapter)
REGISTRY: dict[str, tuple[Task, Adapter]] = {
    name: (task, dataset.examples)
    for dataset in (demo, magnatagatune, gtzan, giantsteps, emomusic)
    for name, task in dataset.TASKS.items()
}


def task_names() -> list[str]:
    return sorted(REGISTRY)


def known_tasks(task_files: tuple[Path, ...] = ()) -> dict[str, tuple[Task, Adapter]]:
    """The built-in tasks and those of `task_files`, each file read and checked whole (a mistake raises
    DatasetError naming the file and line); a file may not reuse a name that is taken."""
    known = dict(REGISTRY)
    for path in task_files:
        task, adapter = load_task_file(path)
        if task.name in known:
            raise DatasetError(f"{path}: name {task.name!r} is already a task; set another name: in the file")
        known[task.name] = (task, adapter)
    return known


def chosen_tasks(tasks: list[str], task_files: tuple[Path, ...]) -> dict[str, tuple[Task, Adapter]]:
    """`tasks` by name, among the built-in ones and those of `task_files`; a ValueError names the unknown ones."""
    known = known_tasks(task_files)
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise ValueError(f"unknown probe task(s) {unknown}; known: {sorted(known)}, or a --task-file")
    return {name: known[name] for name in tasks}


def checkpoint_step(checkpoint: Path) -> int | None:
    """The training step of a run's checkpoints/step_N or exports/step_N; None for a foreign model."""
    return step_of(checkpoint)


@dataclass(frozen=True)
class ProbeSettings:
    """Where the datasets and cached features are, and how heads are trained: the same for every checkpoint."""

    data_root: Path
    seeds: tuple[int, ...] = (0,)  # one head per seed; results report mean ± std
    cache: Path | None = None  # None: ~/.cache/music2vec/features
    head: HeadConfig = field(default_factory=HeadConfig)
    # several heads around `head`, the best on the valid split reported: MARBLE's lr sweep or JukeMIR's 216-head grid
    search: Literal["lr", "jukemir"] | None = None
    # one probe per hidden state (a layer-wise curve): their indices, or "all"; None: learned weights over 1..L
    layers: tuple[int, ...] | Literal["all"] | None = None
    precision: FeaturePrecision = "fp32"  # bf16: the encoder under bf16 autocast (PROBES.md: what it changes)
    progress: bool = True
    task_files: tuple[Path, ...] = ()  # tasks of one's own (probes.datasets.task_file), beside the built-in ones
    random_init: bool = False  # nightly: also the run's model before its first update (step 0), as a reference
    # MARBLE's (the default) or JukeMIR's: one feature vector per clip, its 216-head grid, its random-batch loop
    protocol: Protocol = "marble"


def probe(checkpoint: Path, tasks: list[str], settings: ProbeSettings) -> list[dict[str, Any]]:
    """One row per (task, layer, seed, metric) on the test split, in the order of `tasks` and `settings.seeds`."""
    chosen = chosen_tasks(tasks, settings.task_files)
    check_protocol(settings)
    folder = model_folder(checkpoint)
    _check_layers(settings.layers, folder)
    rows = []
    for name, (task, adapter) in chosen.items():
        examples = adapter(task, Path(settings.data_root))
        features = task_features(
            folder,
            task,
            examples,
            cache=settings.cache,
            precision=settings.precision,
            progress=settings.progress,
            protocol=settings.protocol,
        )
        for layer in _layers(settings.layers, hidden_states=features.values.shape[1]):
            heads = _candidates(settings, layer)
            for seed in settings.seeds:
                head, result = best_on_valid(
                    task, examples, features, seed=seed, heads=heads, protocol=settings.protocol
                )
                rows += [
                    {
                        "checkpoint": str(checkpoint),
                        "step": checkpoint_step(checkpoint),
                        "task": name,
                        "metric": metric,
                        "value": value,
                        "primary": metric == task.monitor,
                        "seed": seed,
                        "precision": settings.precision,
                        "protocol": settings.protocol,
                        "head": asdict(head)
                        | {
                            "lr": head.lr or task.lr,
                            "epochs": result.epochs,
                            "steps": result.steps,
                            "ensemble": result.ensemble,
                        },
                        "valid": result.valid[metric],
                        "time": time.time(),
                    }
                    for metric, value in result.test.items()
                ]
    _check_finite(rows)
    return rows


def _check_finite(rows: list[dict[str, Any]]) -> None:
    """No score that is not a number reaches a results file: it would poison every mean over seeds after it."""
    bad = next((row for row in rows if not math.isfinite(row["value"])), None)
    if bad is not None:
        raise ValueError(
            f"probing {bad['checkpoint']} on {bad['task']} (seed {bad['seed']}) gave {bad['metric']}={bad['value']}:"
            " the head diverged (try a lower --lr, or --standardize), or the test split cannot measure it (a label"
            " it never holds). Nothing was written"
        )


def probed_layers(layers: tuple[int, ...] | Literal["all"] | None, folder: Path) -> list[int | None]:
    """The hidden states a probe of the model in `folder` has a head for (None: learned weights over them all)."""
    return _layers(layers, hidden_states=_hidden_states(folder))


def _hidden_states(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"] + 1


def _layers(layers: tuple[int, ...] | Literal["all"] | None, *, hidden_states: int) -> list[int | None]:
    if layers is None:
        return [None]
    return list(range(hidden_states)) if layers == "all" else list(layers)


def _check_layers(layers: tuple[int, ...] | Literal["all"] | None, folder: Path) -> None:
    """Asked-for hidden states exist: said before any feature is extracted."""
    if isinstance(layers, tuple):
        hidden_states = _hidden_states(folder)
        wrong = [layer for layer in layers if not 0 <= layer < hidden_states]
        if wrong:
            raise ValueError(f"layers {wrong}: {folder} has hidden states 0..{hidden_states - 1}")


def check_protocol(settings: ProbeSettings) -> None:
    """JukeMIR's protocol probes one named hidden state per head with its own grid: said before any work."""
    if settings.protocol != "jukemir":
        return
    if settings.layers is None:
        raise ValueError(
            "--protocol jukemir probes one hidden state at a time, as JukeMIR probed one Jukebox layer: name it"
            " with --layers N (or --layers all for a layer-wise curve)"
        )
    if settings.search is not None:
        raise ValueError(
            f"--protocol jukemir trains JukeMIR's own 216-head grid; leave out --search {settings.search}"
        )


def _candidates(settings: ProbeSettings, layer: int | None) -> list[HeadConfig]:
    base = replace(settings.head, layer=layer)
    if settings.protocol == "jukemir":
        return jukemir_grid(base)
    searches = {"lr": lr_sweep, "jukemir": jukemir_grid}
    return searches[settings.search](base) if settings.search else [base]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """task, layer, metric, mean ± std over seeds (and how many seeds), primary metrics first; headed by the
    protocol when it is JukeMIR's."""
    groups: dict[tuple[str, int | None, str], list[float]] = {}
    primary: dict[tuple[str, int | None, str], bool] = {}
    for row in rows:
        key = (row["task"], row["head"].get("layer"), row["metric"])
        groups.setdefault(key, []).append(row["value"])
        primary[key] = row["primary"]

    def order(key: tuple[str, int | None, str]) -> tuple[str, int, bool]:
        task, layer, _ = key
        return task, -1 if layer is None else layer, not primary[key]

    lines = ["task                 layer    metric               test (mean ± std over seeds)"]
    if any(row.get("protocol") == "jukemir" for row in rows):
        lines.insert(0, "under JukeMIR's probe protocol (--protocol jukemir)")
    for key in sorted(groups, key=order):
        task, layer, metric = key
        values = groups[key]
        mean, spread = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        where = "weighted" if layer is None else str(layer)
        lines.append(f"{task:<20} {where:<8} {metric:<20} {mean:.4f} ± {spread:.4f} (n={len(values)})")
    return "\n".join(lines) + "\n"
