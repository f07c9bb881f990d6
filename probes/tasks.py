"""Probe tasks: what is predicted, how it is scored, and the head's training settings (MARBLE,
docs/ALGORITHM.md §10.2).

Every task reads one list of `Example`s from its dataset adapter; a task's primary metric (`monitor`) drives
early stopping and the LR schedule, and is the one reported first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["multiclass", "multilabel", "regression"]
Normalise = Literal["file", "window"]  # audio normalised over the whole file, then cut, or each window on its own
# How heads are trained and what one example is: MARBLE's (30 s windows, the epoch loop; the default) or JukeMIR's
# (one feature vector per clip of the dataset, random batches; docs/PROBES.md)
Protocol = Literal["marble", "jukemir"]


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
    # published test scores, as fractions: model -> metric -> value (Music2Vec crop 5 s, and Jukebox, by JukeMIR)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    # a file's last window shorter than this is dropped (MARBLE: 1 s; JukeMIR's 30 s clips keep whole ones only)
    min_window_seconds: float = 1.0
    normalise: Normalise = "file"
    # JukeMIR's clip: the whole file (one feature vector per file), or its 30 s windows (GiantSteps' clips)
    jukemir_clip: Literal["file", "window"] = "file"
    # how window outputs become a song's (see probes.head.SONG_ENSEMBLES); with several, the best on valid is used
    song_ensembles: tuple[str, ...] = ("mean",)

    @property
    def outputs(self) -> int:
        return len(self.labels)


Adapter = Callable[[Task, Path], list[Example]]  # lists a task's examples under a data root
