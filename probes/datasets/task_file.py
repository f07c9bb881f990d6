"""A probe task of one's own, from a file: a YAML that describes the task and a CSV or JSON-lines table of its
examples. `music2vec probe --task-file` and `music2vec nightly --task-file` use it as they use a built-in task.

    name: my_key                  # default: the YAML's file name without its suffix
    kind: multiclass              # multiclass, multilabel or regression
    labels: [C major, A minor]    # the classes, the tags, or the names of the regression targets
    metric: weighted_score        # the primary metric; it must fit the kind (METRICS)
    examples: my_key.csv          # .csv or .jsonl, relative to the YAML
    head:                         # optional: the head's training (defaults as for the built-in tasks)
      lr: 0.001
      plateau_patience: 5
      stop_patience: 20
      min_window_seconds: 1.0     # a file's last window shorter than this is dropped

Each example is one audio file: `audio` (a path relative to the YAML), `split` (train, valid or test), its target,
and optionally `song` (files of one song are scored together). The target: multiclass, `label` (one of `labels`);
multilabel, `labels` (those that apply: separated by `;` in a CSV, a list in JSON lines); regression, one column
(key) per name in `labels`, a number.

Everything is checked when the file is read, before any feature is extracted; each mistake is one DatasetError
naming the file, the line or key, and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mir_eval
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from probes.datasets.files import DatasetError, check_audio_header, read_table, read_text
from probes.tasks import Adapter, Example, Kind, Task

KINDS: tuple[Kind, ...] = ("multiclass", "multilabel", "regression")
METRICS: dict[str, tuple[str, ...]] = {  # what `probes.metrics.score` computes for each kind
    "multiclass": ("accuracy", "weighted_score"),
    "multilabel": ("roc_auc", "average_precision"),
    "regression": ("r2",),
}
KEYS = {"name", "kind", "labels", "metric", "examples", "head"}
HEAD_KEYS = {"lr", "plateau_patience", "stop_patience", "min_window_seconds"}
SPLITS = ("train", "valid", "test")
LABELS_SHOWN = 8  # in a message about a label that is not among them
TABLE = "a CSV with the columns audio, split, the target and optionally song (see docs/PROBES.md)"


def load_task_file(path: Path) -> tuple[Task, Adapter]:
    """The task a file describes, and an adapter giving its examples (checked now; the data root is not used)."""
    path = Path(path).resolve()
    spec = _read_spec(path)
    task = _task(path, spec)
    examples = _examples(path, path.parent / str(spec["examples"]), task)
    return task, lambda _task, _data_root: examples


def _read_spec(path: Path) -> dict[str, Any]:
    read_text(path, "a probe task file (YAML)")
    try:
        loaded = OmegaConf.load(path)  # YAML's safe loader: plain data only
    except (OmegaConfBaseException, ValueError) as error:
        raise DatasetError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise DatasetError(f"{path}: expected a mapping with the keys {sorted(KEYS)}")
    spec = OmegaConf.to_container(loaded)
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}; a task file has {sorted(KEYS)}")
    missing = [key for key in ("kind", "labels", "metric", "examples") if key not in spec]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {missing}; a task file has {sorted(KEYS)}")
    return spec


def _task(path: Path, spec: dict[str, Any]) -> Task:
    kind, labels, metric = spec["kind"], spec["labels"], spec["metric"]
    if kind not in KINDS:
        raise DatasetError(f"{path}: kind: {kind!r} is not one of {list(KINDS)}")
    if not isinstance(labels, list) or not labels or len(set(map(str, labels))) != len(labels):
        raise DatasetError(f"{path}: labels: expected a list of distinct names, got {labels!r}")
    labels = tuple(str(label) for label in labels)
    if metric not in METRICS[kind]:
        raise DatasetError(f"{path}: metric: {metric!r} does not fit kind {kind}; use one of {list(METRICS[kind])}")
    if metric == "weighted_score":
        _check_key_labels(path, labels)
    head = spec.get("head") or {}
    if not isinstance(head, dict) or not set(head) <= HEAD_KEYS:
        raise DatasetError(f"{path}: head: expected a mapping with some of {sorted(HEAD_KEYS)}, got {head!r}")
    name = str(spec.get("name") or path.stem)
    settings = {key: _positive(path, key, value) for key, value in head.items()}
    return Task(name, kind, labels, monitor=metric, **settings)


def _check_key_labels(path: Path, labels: tuple[str, ...]) -> None:
    """weighted_score compares keys (mir_eval): every label must be one, as 'C major' or 'F# minor'."""
    not_keys = [label for label in labels if not _is_key(label)]
    if not_keys:
        raise DatasetError(
            f"{path}: labels: {not_keys[0]!r} is not a key (e.g. 'C major', 'F# minor'); metric weighted_score"
            " scores keys, use accuracy for other classes"
        )


def _is_key(label: str) -> bool:
    try:
        mir_eval.key.validate_key(label)
    except ValueError:
        return False
    return True


def _positive(path: Path, key: str, value: Any) -> float | int:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise DatasetError(f"{path}: head.{key}: expected a positive number, got {value!r}")
    return int(value) if key.endswith("patience") else float(value)


def _examples(spec_path: Path, table: Path, task: Task) -> list[Example]:
    """Every example of the table, checked row by row; then that each split has some."""
    if table.suffix not in (".csv", ".jsonl"):
        raise DatasetError(f"{spec_path}: examples: {table.name} must be a .csv or a .jsonl file")
    found = [_example(table, line, row, task) for line, row in _rows(table)]
    for split in SPLITS:
        if not any(example.split == split for example in found):
            raise DatasetError(f"{table}: no {split} examples; every split ({', '.join(SPLITS)}) needs some")
    return found


def _rows(table: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (by its header) or a JSON-lines file."""
    if table.suffix == ".csv":
        rows = read_table(table, ["audio", "split"], delimiter=",", expected=TABLE)
        yield from enumerate(rows, start=2)  # line 1 is the header
        return
    text = read_text(table, "one JSON object per line: audio, split, the target and optionally song")
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            row = json.loads(content)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{table}, line {line}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{table}, line {line}: expected a JSON object with audio, split and the target")
        yield line, row


def _example(table: Path, line: int, row: dict[str, Any], task: Task) -> Example:
    where = f"{table}, line {line}"
    for column in ("audio", "split"):
        if not row.get(column):
            raise DatasetError(f"{where}: no {column}")
    if row["split"] not in SPLITS:
        raise DatasetError(f"{where}: split {row['split']!r} is not one of {list(SPLITS)}")
    audio = (table.parent / str(row["audio"])).resolve()
    if not audio.is_file():
        raise DatasetError(f"{where}: audio {row['audio']!r}: no such file ({audio})")
    try:
        check_audio_header(audio)
    except DatasetError as error:
        raise DatasetError(f"{where}: {error}") from None
    return Example(audio, row["split"], _target(where, row, task), song=str(row.get("song") or ""))


def _target(where: str, row: dict[str, Any], task: Task) -> int | tuple[int, ...] | tuple[float, ...]:
    if task.kind == "multiclass":
        return _label_index(where, row.get("label"), task)
    if task.kind == "multilabel":
        given = row.get("labels")
        names = [name.strip() for name in given.split(";") if name.strip()] if isinstance(given, str) else given
        if not isinstance(names, list):
            raise DatasetError(f"{where}: labels: expected the labels that apply, got {given!r}")
        return tuple(sorted({_label_index(where, name, task) for name in names}))
    return tuple(_number(where, row, name) for name in task.labels)


def _label_index(where: str, label: Any, task: Task) -> int:
    if label not in task.labels:
        shown = ", ".join(task.labels[:LABELS_SHOWN]) + (", ..." if len(task.labels) > LABELS_SHOWN else "")
        raise DatasetError(f"{where}: label {label!r} is not one of the task's labels ({shown})")
    return task.labels.index(label)


def _number(where: str, row: dict[str, Any], name: str) -> float:
    try:
        value = float(row[name])
    except KeyError:
        raise DatasetError(f"{where}: no value for the regression target {name!r}") from None
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {name}: expected a number, got {row[name]!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {name}: expected a finite number, got {row[name]!r}")
    return value
