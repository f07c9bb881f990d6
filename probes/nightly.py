"""The nightly probe job: every COMPLETE checkpoint of a run gets probed once, and the run's report follows.

    RUN_DIR/probes/results.jsonl   one line per (checkpoint, task, seed, metric), append-only
    RUN_DIR/probes/report.md       each task's metrics against training step, with the published references
    RUN_DIR/tb/                    probe/<task>/<metric> scalars at the checkpoint's step, beside the loss curves

Idempotent: what results.jsonl already holds is never probed again, so a second run right after does nothing and
a run after a crash finishes only what is missing. A lock file keeps two jobs off one run directory.
"""

from __future__ import annotations

import fcntl
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from data import jsonlines
from probes.probe import REGISTRY, ProbeSettings, probe
from trainer.layout import (
    COMPLETE,
    CONFIG,
    NIGHTLY_LOCK,
    PROBE_REPORT,
    PROBE_RESULTS,
    TENSORBOARD,
    complete_checkpoints,
)


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
        done = {(row["step"], row["task"], row["seed"]) for row in read_results(run_dir)}
        try:
            for step, folder in complete_checkpoints(run_dir):
                for task in tasks:
                    missing = tuple(seed for seed in settings.seeds if (step, task, seed) not in done)
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


def _probe_unless_pruned(folder: Path, task: str, settings: ProbeSettings) -> list[dict[str, Any]] | None:
    """The task's rows, or None when training pruned the checkpoint before or while it was read."""
    try:
        if (folder / COMPLETE).is_file():
            return probe(folder, [task], settings)
    except Exception as error:
        if (folder / COMPLETE).is_file():  # still there: the failure is the checkpoint's or the task's
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
    """Every whole line, the newest of each (checkpoint, task, seed, metric, layer): two jobs that both probed a
    checkpoint (a filesystem without locks, a results file copied between runs) count once. A line cut short by a
    crash is skipped, and its task probed again."""
    newest = {_identity(row): row for row in jsonlines.read(run_dir / PROBE_RESULTS)}
    return list(newest.values())


def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row.get("step"), row.get("task"), row.get("seed"), row.get("metric"), row.get("head", {}).get("layer"))


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
        for (task, metric), values in _by_metric(rows).items():
            self.writer.add_scalar(f"probe/{task}/{metric}", statistics.mean(values), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _by_metric(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    grouped: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        grouped.setdefault((row["task"], row["metric"]), []).append(row["value"])
    return grouped


def write_report(run_dir: Path) -> Path:
    """probes/report.md: per task and metric, the mean over seeds at every probed step, and the published values."""
    rows = read_results(run_dir)
    lines = [f"# Probes of {run_dir.name}", "", "Test scores, mean ± std over seeds, by training step.", ""]
    tasks = sorted({row["task"] for row in rows})
    for task in tasks:
        models = list(REGISTRY[task][0].references) if task in REGISTRY else []
        lines += [
            f"## {task}",
            "",
            "| step | metric | score | seeds |" + "".join(f" {model} (published) |" for model in models),
            "|---|---|---|---|" + "---|" * len(models),
        ]
        by_step: dict[tuple[int, str], list[float]] = {}
        for row in rows:
            if row["task"] == task:
                by_step.setdefault((row["step"], row["metric"]), []).append(row["value"])
        for (step, metric), values in sorted(by_step.items()):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            known = _published(task, metric)
            published = "".join(f" {known[model]:.3f} |" if model in known else " - |" for model in models)
            lines.append(
                f"| {step} | {metric} | {statistics.mean(values):.4f} ± {spread:.4f} | {len(values)} |{published}"
            )
        lines.append("")
    path = run_dir / PROBE_REPORT
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(path)
    if rows:
        plot_report(rows, path.with_suffix(".png"))
    return path


def _published(task: str, metric: str) -> dict[str, float]:
    """model -> published test score of a task's metric (none for the demo tasks)."""
    references = REGISTRY[task][0].references if task in REGISTRY else {}
    return {model: scores[metric] for model, scores in references.items() if metric in scores}


def plot_report(rows: list[dict[str, Any]], path: Path) -> None:
    """Each task's primary metric, and every metric with a published value, against training step (mean and
    spread over seeds); the published values are dashed lines."""
    import matplotlib as mpl

    mpl.use("Agg")  # files only: the nightly job has no display
    import matplotlib.pyplot as plt

    panels = sorted(
        {(row["task"], row["metric"]) for row in rows if row["primary"] or _published(row["task"], row["metric"])}
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, (task, metric) in zip(axes[0], panels, strict=True):
        by_step: dict[int, list[float]] = {}
        for row in rows:
            if (row["task"], row["metric"]) == (task, metric):
                by_step.setdefault(row["step"], []).append(row["value"])
        steps = sorted(by_step)
        means = [statistics.mean(by_step[step]) for step in steps]
        spreads = [statistics.stdev(by_step[step]) if len(by_step[step]) > 1 else 0.0 for step in steps]
        axis.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, label="this run")
        for (model, value), color in zip(_published(task, metric).items(), ("gray", "black"), strict=False):
            axis.axhline(value, linestyle="--", color=color, label=f"{model} (published)")
        axis.set(title=task, xlabel="training step", ylabel=metric)
        axis.legend(fontsize="small")
    figure.tight_layout()
    partial = path.with_suffix(".partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    partial.rename(path)
