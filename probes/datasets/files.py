"""What every dataset adapter needs: errors that name the file and what it should hold, tables read by their
headers, audio checked before any feature is extracted, and JukeMIR's artist-hash splits."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

from probes.tasks import Example


class DatasetError(ValueError):
    """A dataset file is missing or is not what the published dataset holds."""


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; expected {expected}")
    return path


def read_table(path: Path, columns: Sequence[str], *, delimiter: str, expected: str) -> list[dict[str, str]]:
    """Every row of a CSV or TSV file as {column: stripped value}, after checking that it has `columns`."""
    require_file(path, expected)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        found = reader.fieldnames or []
        missing = [column for column in columns if column not in found]
        if missing:
            raise DatasetError(
                f"{path}: no column(s) {missing} among the {len(found)} of its header; expected {expected}"
            )
        rows = [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
    if not rows:
        raise DatasetError(f"{path}: no rows; expected {expected}")
    return rows


def require_audio(examples: list[Example], dataset: Path) -> list[Example]:
    """All audio files exist: a missing one stops the probe before any feature is extracted."""
    missing = [str(example.path) for example in examples if not example.path.is_file()]
    if missing:
        raise DatasetError(
            f"{dataset}: {len(missing)} of {len(examples)} audio files are missing, e.g. {missing[:3]};"
            " download or unpack the dataset's audio there"
        )
    for split in ("train", "valid", "test"):
        if not any(example.split == split for example in examples):
            raise DatasetError(f"{dataset}: no {split} examples; is the dataset complete?")
    return examples


def hash_split(name: str, *, train: int, valid: int) -> str:
    """JukeMIR's split by artist: the name's SHA-1 as an integer, modulo train + valid parts."""
    parts = int(hashlib.sha1(name.encode("utf-8"), usedforsecurity=False).hexdigest(), 16) % (train + valid)
    return "train" if parts < train else "valid"
