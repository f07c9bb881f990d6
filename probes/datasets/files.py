"""What every dataset adapter needs: errors that name the file and what it should hold, tables read by their
headers, audio checked before any feature is extracted, and JukeMIR's artist-hash splits."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import soundfile

from probes.tasks import Example


class DatasetError(ValueError):
    """A dataset file is missing or is not what the published dataset holds."""


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; expected {expected}")
    return path


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of a file the dataset must have."""
    require_file(path, expected)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(_not_utf8(path, error)) from None


def read_table(path: Path, columns: Sequence[str], *, delimiter: str, expected: str) -> list[dict[str, str]]:
    """Every row of a CSV or TSV file as {column: stripped value}, after checking that it has `columns`."""
    reader = csv.DictReader(io.StringIO(read_text(path, expected), newline=""), delimiter=delimiter)
    found = reader.fieldnames or []
    missing = [column for column in columns if column not in found]
    if missing:
        raise DatasetError(f"{path}: no column(s) {missing} among the {len(found)} of its header; expected {expected}")
    rows = [{key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader]
    if not rows:
        raise DatasetError(f"{path}: no rows; expected {expected}")
    return rows


def _not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    line = error.object[: error.start].count(b"\n") + 1
    return (
        f"{path}, line {line}: not UTF-8 text (byte {error.object[error.start]:#04x}); convert the file to UTF-8,"
        f" e.g. iconv -f latin1 -t utf-8"
    )


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
    for example in examples:  # headers only: seconds for a whole dataset, before hours of extraction
        check_audio_header(example.path)
    return examples


def check_audio_header(path: Path) -> None:
    """A DatasetError naming `path` when it is empty or its header cannot be read; what decoding alone can find
    (samples that are not finite, a file cut short) is checked as each file is decoded."""
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: empty file; download it again, or remove it from the dataset")
    try:
        frames = soundfile.info(str(path)).frames
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise DatasetError(f"{path}: cannot be decoded ({error}); download it again, or remove it") from None
    if frames == 0:
        raise DatasetError(f"{path}: holds no audio samples; download it again, or remove it from the dataset")


def hash_split(name: str, *, train: int, valid: int) -> str:
    """JukeMIR's split by artist: the name's SHA-1 as an integer, modulo train + valid parts."""
    parts = int(hashlib.sha1(name.encode("utf-8"), usedforsecurity=False).hexdigest(), 16) % (train + valid)
    return "train" if parts < train else "valid"
