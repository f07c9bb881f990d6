"""JSON-lines files that only grow: metrics, job attempts, probe results, the shard writer's journal.

A crash, a kill or a full disk can cut the line being written. So a line is written whole (one `write` of an
`O_APPEND` file) and fsynced; a reader skips a line that does not parse, and says so once per file; an append after
a cut line starts on a new line, so the cut stays on its own; a rewrite goes through a temporary file and a rename,
so readers see the old content or the new, never half of either.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_reported: set[Path] = set()  # files whose damaged lines were reported by this process


def append(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Append `entries`, one line each, in one write; fsynced: after a crash they are there entirely or not at all."""
    text = "".join(json.dumps(entry) + "\n" for entry in entries)
    if not text:
        return
    if not _ends_with_newline(path):
        text = "\n" + text  # a line cut by a crash stays on its own, and is skipped when read
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _write_all(descriptor, text.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read(path: Path) -> list[dict[str, Any]]:
    """Every whole line of `path` (none if it does not exist); damaged lines are skipped, reported once on stderr."""
    if not path.is_file():
        return []
    entries, damaged = [], []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        entry = _parse(line)
        if entry is None:
            damaged.append(number)
        else:
            entries.append(entry)
    if damaged and path not in _reported:
        _reported.add(path)
        print(
            f"{path}: skipped line(s) {', '.join(map(str, damaged))}: not a whole JSON object (cut short by a crash"
            " or a full disk); the other lines are used",
            file=sys.stderr,
            flush=True,
        )
    return entries


def rewrite(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Replace the content of `path` with `entries`, atomically (see `write_atomically`)."""
    write_atomically(path, "".join(json.dumps(entry) + "\n" for entry in entries))


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temporary file, fsynced, renamed over it, the folder fsynced. Readers see the
    old content or the new, never a mix, also when several processes write the same file at once."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the names in `folder` (new files, renames) survive a power cut, as fsync does for a file's bytes."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return entry if isinstance(entry, dict) else None


def _ends_with_newline(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:  # missing, or empty (a seek before its start)
        return True


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
