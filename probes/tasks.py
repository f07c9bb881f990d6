"""Probe tasks: what is predicted, how it is scored, and the head's training settings (spec §8.2, MARBLE).

Every task reads one list of `Example`s from its dataset adapter; a task's primary metric (`monitor`) drives
early stopping and the LR schedule, and is the one reported first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["multiclass", "multilabel", "regression"]
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    path: Path  # an audio file
    split: str  # train, valid or test
    target: int | tuple[int, ...] | tuple[float, ...]  # class index; tag indices; regression targets
    song: str = ""  # windows and clips of one song are scored together; default: the file itself

    @property
    def song_id(self) -> str:
        return self.song or str(self.path)


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    labels: tuple[str, ...]  # class names, tag names, or regression target names
    monitor: str  # the primary metric, higher is better
    lr: float = 1e-3
    plateau_patience: int = 5
    stop_patience: int = 20
    reference: dict[str, float] = field(default_factory=dict)  # published Music2Vec values (crop 5 s), in %

    @property
    def outputs(self) -> int:
        return len(self.labels)
