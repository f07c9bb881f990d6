"""The demo tasks on rendered compositions (`data/demo.py`): key (24 classes), tempo (regression) and instruments
(multi-label), each with train / valid / test clips of the demo's probe pool: tunes the pretraining corpus never
plays, each split its own tunes."""

from __future__ import annotations

import json
from pathlib import Path

from data.demo import INSTRUMENTS, KEYS, write_demo_corpus
from probes.tasks import Example, Task

FOLDER = "demo"
CLIPS = {"train": 384, "valid": 64, "test": 128}
SECONDS = 10.0
SEED = 7

TASKS = {
    "demo_key": Task("demo_key", "multiclass", KEYS, monitor="weighted_score", lr=1e-3),
    "demo_tempo": Task("demo_tempo", "regression", ("tempo",), monitor="r2", lr=1e-3),
    "demo_instruments": Task("demo_instruments", "multilabel", INSTRUMENTS, monitor="roc_auc", lr=1e-3),
}


def prepare(data_root: Path, clips: dict[str, int] = CLIPS) -> Path:
    """Write the demo clips under DATA_ROOT/demo once (about a minute); later calls reuse them, however many."""
    folder = Path(data_root) / FOLDER
    done = folder / "COMPLETE"
    if not done.is_file():
        for offset, (split, count) in enumerate(clips.items()):
            write_demo_corpus(folder / split, count, seed=SEED * 10 + offset, seconds=SECONDS, pool=f"probe_{split}")
        done.write_text("")
    return folder


def examples(task: Task, data_root: Path) -> list[Example]:
    folder = prepare(data_root)
    found = []
    for split in CLIPS:
        for audio in sorted((folder / split).glob("*.flac")):
            labels = json.loads(audio.with_suffix(".json").read_text())
            found.append(Example(audio, split, _target(task, labels)))
    return found


def _target(task: Task, labels: dict) -> int | tuple:
    if task.name == "demo_key":
        return KEYS.index(labels["key"])
    if task.name == "demo_tempo":
        return (float(labels["tempo"]),)
    return tuple(INSTRUMENTS.index(name) for name in labels["instruments"])
