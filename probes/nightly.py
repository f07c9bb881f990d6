"""The nightly probe job: every COMPLETE checkpoint of a run gets probed once, and the run's report follows.

    RUN_DIR/probes/results.jsonl   one line per (checkpoint, task, seed, metric), append-only
    RUN_DIR/probes/report.md       each task's metrics against training step, with the published references
    RUN_DIR/tb/                    probe/<task>/<metric> scalars at the checkpoint's step, beside the loss curves
                                   (probe/<task>/layerNN/<metric> for a probe of one hidden state)
    RUN_DIR/probes/random_init/    with ProbeSettings.random_init: the model before its first update, probed as
                                   step 0, the report's reference line

Idempotent: what results.jsonl already holds is never probed again, so a second run right after does nothing and
a run after a crash finishes only what is missing. A lock file keeps two jobs off one run directory.
"""

from __future__ import annotations

import fcntl
import shutil
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from data import jsonlines
from model import Music2Vec, save_hf
from probes.features import model_folder
from probes.probe import REGISTRY, ProbeSettings, probe, probed_layers
from trainer.config import load_config
from trainer.layout import (
    COMPLETE,
    CONFIG,
    NIGHTLY_LOCK,
    PROBE_RANDOM_INIT,
    PROBE_REPORT,
    PROBE_RESULTS,
    TENSORBOARD,
    complete_checkpoints,
    tag,
)

PROTOCOL_MARK = "@"  # giantsteps_key@jukemir: the task under JukeMIR's protocol, in the report


class RunBusyError(RuntimeError):
    """Another nightly job holds this run directory's lock."""


def nightly(run_dir: Path, tasks: list[str], settings: ProbeSettings) -> list[dict[str, Any]]:
    """Probe what is missing, write its TensorBoard scalars and results, regenerate the report; the new rows. A
    checkpoint that training prunes meanwhile is skipped; after any other failure the report still shows what the
    results hold."""
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {CONFIG})")
    new_rows: list[dict[str, Any]] = []
    scalars = _ProbeScalars(run_dir)
    with _locked(run_dir / NIGHTLY_LOCK):
        done = {(row["step"], row["task"], row["seed"], _layer(row), _protocol(row)) for row in read_results(run_dir)}
        try:
            for step, folder in _models(run_dir, settings):
                layers = _expected_layers(settings, folder)
                for task in tasks:
                    missing = tuple(
                        seed
                        for seed in settings.seeds
                        if any((step, task, seed, layer, settings.protocol) not in done for layer in layers)
                    )
                    if not missing:
                        continue
                    rows = _probe_unless_pruned(folder, task, replace(settings, seeds=missing))
                    if rows is None:
                        break
                    scalars.write(step, rows)
                    jsonlines.append(run_dir / PROBE_RESULTS, rows)  # a task's rows all or none
                    new_rows += rows
        finally:
            scalars.close()
            write_report(run_dir)
    return new_rows


def _models(run_dir: Path, settings: ProbeSettings) -> list[tuple[int, Path]]:
    """(step, folder) of what to probe: the random init as step 0 if asked for, then every complete checkpoint."""
    first = [(0, random_init_export(run_dir))] if settings.random_init else []
    return first + complete_checkpoints(run_dir)


def random_init_export(run_dir: Path) -> Path:
    """The run's model as training built it, before its first update (the trainer seeds torch with train.seed, then
    builds the model), exported once under probes/random_init/."""
    folder = run_dir / PROBE_RANDOM_INIT / tag(0)
    if not (folder / "model.safetensors").is_file():
        cfg = load_config(run_dir / CONFIG)
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        with torch.random.fork_rng():  # the caller's random state stays as it was
            torch.manual_seed(cfg.train.seed)
            save_hf(Music2Vec(cfg.model).encoder, partial)
        partial.rename(folder)
    return folder


def _expected_layers(settings: ProbeSettings, folder: Path) -> list[int | None]:
    """The hidden states a probe of `folder` covers; for 'all' read from its model, unless training pruned it."""
    try:
        return probed_layers(settings.layers, model_folder(folder))
    except (OSError, ValueError):
        return [None]  # pruned: `_probe_unless_pruned` says so


def _layer(row: dict[str, Any]) -> int | None:
    return row.get("head", {}).get("layer")


def _protocol(row: dict[str, Any]) -> str:
    return row.get("protocol", "marble")  # rows written before JukeMIR's protocol existed are MARBLE's


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the report shows it: a task probed under JukeMIR's protocol is a task of its own there."""
    protocol = _protocol(row)
    return row if protocol == "marble" else row | {"task": f"{row['task']}{PROTOCOL_MARK}{protocol}"}


def _builtin(shown_task: str) -> str:
    return shown_task.split(PROTOCOL_MARK, maxsplit=1)[0]


def _present(folder: Path) -> bool:
    """A checkpoint still COMPLETE, or the random init's export."""
    return (folder / COMPLETE).is_file() or (folder / "model.safetensors").is_file()


def _probe_unless_pruned(folder: Path, task: str, settings: ProbeSettings) -> list[dict[str, Any]] | None:
    """The task's rows, or None when training pruned the checkpoint before or while it was read."""
    try:
        if _present(folder):
            return probe(folder, [task], settings)
    except Exception as error:
        if _present(folder):  # still there: the failure is the checkpoint's or the task's
            raise RuntimeError(f"probing {folder} on {task}: {type(error).__name__}: {error}") from error
    print(
        f"{folder}: skipped, pruned by its training run (train.keep_last) before it could be probed; probe more"
        " often, or keep checkpoints for good with train.keep_every",
        file=sys.stderr,
        flush=True,
    )
    return None


def nightly_runs(run_dirs: list[Path], tasks: list[str], settings: ProbeSettings) -> dict[Path, int | str]:
    """`nightly` on each run directory, one after the other whatever happens to the others: how many new rows each
    got, or why it got none (another job holds it, or it failed: said on stderr as it happens)."""
    return {run_dir: _new_rows_or_why_not(run_dir, tasks, settings) for run_dir in run_dirs}


def _new_rows_or_why_not(run_dir: Path, tasks: list[str], settings: ProbeSettings) -> int | str:
    try:
        return len(nightly(run_dir, tasks, settings))
    except RunBusyError as busy:
        print(f"skipped: {busy}", file=sys.stderr, flush=True)
        return f"skipped: {busy}"
    except Exception as error:  # noqa: BLE001 - one run's failure must not cost the others their night
        failure = f"failed: {type(error).__name__}: {error}"
        print(f"{run_dir}: {failure}", file=sys.stderr, flush=True)
        return failure


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """Every whole line, the newest of each (checkpoint, task, seed, metric, layer, protocol): two jobs that both
    probed a checkpoint (a filesystem without locks, a results file copied between runs) count once. A line cut
    short by a crash is skipped, and its task probed again."""
    newest = {_identity(row): row for row in jsonlines.read(run_dir / PROBE_RESULTS)}
    return list(newest.values())


def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("step"), row.get("task"), row.get("seed"), row.get("metric"), _layer(row), _protocol(row))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(f"{path}: another nightly probe job is working on this run directory") from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP, ENOSYS: the filesystem has no flock
            raise OSError(
                f"{path}: cannot be locked ({error.strerror}): this filesystem does not support flock, which keeps"
                " two nightly jobs off one run. Mount it with locking (NFS with its lock service, Lustre with"
                " -o flock), or put the run directory on one that has it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _ProbeScalars:
    """One TensorBoard event file per nightly run, opened only once something was probed, flushed per task."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer: Any = None

    def write(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD))
        for (task, layer, metric, protocol), values in _by_metric(rows).items():
            self.writer.add_scalar(scalar_tag(task, layer, metric, protocol), statistics.mean(values), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalar_tag(task: str, layer: int | None, metric: str, protocol: str = "marble") -> str:
    """probe/<task>[/jukemir][/layerNN]/<metric>"""
    parts = [
        task,
        *([protocol] if protocol != "marble" else []),
        *([f"layer{layer:02d}"] if layer is not None else []),
    ]
    return "/".join(["probe", *parts, metric])


def _by_metric(rows: list[dict[str, Any]]) -> dict[tuple[str, int | None, str, str], list[float]]:
    """Values by (task, layer, metric, protocol), over seeds."""
    grouped: dict[tuple[str, int | None, str, str], list[float]] = {}
    for row in rows:
        grouped.setdefault((row["task"], _layer(row), row["metric"], _protocol(row)), []).append(row["value"])
    return grouped


def write_report(run_dir: Path) -> Path:
    """probes/report.md: per task, the mean over seeds of every metric at every probed step (step 0: the random
    init, when probed), by hidden state when one was probed alone, and the published values."""
    rows = [_shown(row) for row in read_results(run_dir)]
    lines = [f"# Probes of {run_dir.name}", "", "Test scores, mean ± std over seeds, by training step.", ""]
    if any(PROTOCOL_MARK in row["task"] for row in rows):
        lines += ["Under MARBLE's probe protocol unless the task's name says `@jukemir` (docs/PROBES.md).", ""]
    for task in sorted({row["task"] for row in rows}):
        lines += _task_table(task, [row for row in rows if row["task"] == task])
    path = run_dir / PROBE_REPORT
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(path)
    if rows:
        plot_report(rows, path.with_suffix(".png"))
    return path


def _task_table(task: str, rows: list[dict[str, Any]]) -> list[str]:
    builtin = _builtin(task)
    models = list(REGISTRY[builtin][0].references) if builtin in REGISTRY else []
    layered = any(_layer(row) is not None for row in rows)
    layer_column = " layer |" if layered else ""
    lines = [
        f"## {task}",
        "",
        f"| step |{layer_column} metric | score | seeds |" + "".join(f" {model} (published) |" for model in models),
        "|---|" + "---|" * layered + "---|---|---|" + "---|" * len(models),
    ]
    by_key: dict[tuple[int, int, str], list[float]] = {}
    for row in rows:
        layer = _layer(row)
        by_key.setdefault((row["step"], -1 if layer is None else layer, row["metric"]), []).append(row["value"])
    for (step, layer, metric), values in sorted(by_key.items()):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        known = _published(task, metric)
        published = "".join(f" {known[model]:.3f} |" if model in known else " - |" for model in models)
        shown_step = "0 (random init)" if step == 0 else str(step)
        shown_layer = (" weighted |" if layer < 0 else f" {layer} |") if layered else ""
        mean = statistics.mean(values)
        lines.append(
            f"| {shown_step} |{shown_layer} {metric} | {mean:.4f} ± {spread:.4f} | {len(values)} |{published}"
        )
    return [*lines, ""]


def _published(task: str, metric: str) -> dict[str, float]:
    """model -> published test score of a task's metric (none for the demo tasks)."""
    references = REGISTRY[_builtin(task)][0].references if _builtin(task) in REGISTRY else {}
    return {model: scores[metric] for model, scores in references.items() if metric in scores}


def plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    """Each task's primary metric, and every metric with a published value, against training step (mean and spread
    over seeds; a line per probed hidden state); the published values dashed, the random init (step 0) dotted. A
    task probed layer by layer gets a panel of its layer-wise curve at the newest step."""
    import matplotlib as mpl

    mpl.use("Agg")  # files only: the nightly job has no display
    import matplotlib.pyplot as plt

    panels = sorted(
        {(row["task"], row["metric"]) for row in rows if row["primary"] or _published(row["task"], row["metric"])}
    )
    layered = sorted({row["task"] for row in rows if row["primary"] and _layer(row) is not None})
    count = len(panels) + len(layered)
    figure, axes = plt.subplots(1, count, figsize=(4.5 * count, 3.5), squeeze=False)
    for axis, (task, metric) in zip(axes[0], panels, strict=False):
        _plot_against_step(axis, [row for row in rows if (row["task"], row["metric"]) == (task, metric)], task, metric)
    for axis, task in zip(axes[0][len(panels) :], layered, strict=True):
        _plot_against_layer(axis, [row for row in rows if row["task"] == task and row["primary"]], task)
    figure.tight_layout()
    partial = path.with_suffix(".partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    partial.rename(path)


def _means(rows: list[dict[str, Any]], key: Any) -> tuple[list[Any], list[float], list[float]]:
    """(keys in order, means over seeds, spreads) of `rows` grouped by `key(row)`."""
    grouped: dict[Any, list[float]] = {}
    for row in rows:
        grouped.setdefault(key(row), []).append(row["value"])
    keys = sorted(grouped)
    spreads = [statistics.stdev(grouped[k]) if len(grouped[k]) > 1 else 0.0 for k in keys]
    return keys, [statistics.mean(grouped[k]) for k in keys], spreads


def _plot_against_step(axis: Any, rows: list[dict[str, Any]], task: str, metric: str) -> None:
    for layer in sorted({_layer(row) for row in rows}, key=lambda layer: -1 if layer is None else layer):
        of_layer = [row for row in rows if _layer(row) == layer]
        steps, means, spreads = _means([row for row in of_layer if row["step"] > 0], lambda row: row["step"])
        label = "this run" if layer is None else f"layer {layer}"
        if steps:
            axis.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, label=label)
        random_init = [row["value"] for row in of_layer if row["step"] == 0]
        if random_init and layer is None:
            axis.axhline(statistics.mean(random_init), linestyle=":", color="tab:red", label="random init")
    for (model, value), color in zip(_published(task, metric).items(), ("gray", "black"), strict=False):
        axis.axhline(value, linestyle="--", color=color, label=f"{model} (published)")
    axis.set(title=task, xlabel="training step", ylabel=metric)
    axis.legend(fontsize="small")


def _plot_against_layer(axis: Any, rows: list[dict[str, Any]], task: str) -> None:
    layered = [row for row in rows if _layer(row) is not None]
    newest = max(row["step"] for row in layered)
    for step in (newest, 0) if newest else (0,):
        layers, means, spreads = _means([row for row in layered if row["step"] == step], _layer)
        style = {"marker": "o", "label": f"step {step}"} if step else {"linestyle": ":", "color": "tab:red"}
        if layers:
            axis.errorbar(layers, means, yerr=spreads, capsize=3, **({"label": "random init"} | style))
    xlabel = "hidden state (0: the transformer's input)"
    axis.set(title=f"{task}: by hidden state", xlabel=xlabel, ylabel=rows[0]["metric"])
    axis.legend(fontsize="small")
