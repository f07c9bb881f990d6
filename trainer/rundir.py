"""Who may write a run directory: the user who runs it, or with `train.shared_group` also its group; never others.

Whoever can write into a run directory decides what the next start loads (a checkpoint, a job's pickled function
in `jobs/`), so a run refuses a directory that anyone else can write into, before it reads anything from it. The
processes of a run write with a umask that keeps it that way: `go-w`, or `o-w` for a shared group folder (whose
folders are set-group-ID, so everything in them belongs to the folder's group).
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o022
SHARED_UMASK = 0o002
SHARED_FOLDER_MODE = 0o2775  # group-writable, and what is created inside belongs to the folder's group


def set_umask(*, shared_group: bool) -> None:
    """Everything this process creates from now on: no write for others (nor for the group, unless shared)."""
    os.umask(SHARED_UMASK if shared_group else PRIVATE_UMASK)


def open_run_dir(run_dir: Path, *, shared_group: bool) -> None:
    """Create `run_dir` if it is missing, writable by its owner only (or its group too); refuse one that someone
    else can write into. Sets this process's umask (`set_umask`)."""
    set_umask(shared_group=shared_group)
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        if shared_group:
            run_dir.chmod(SHARED_FOLDER_MODE)
    check_writers(run_dir, shared_group=shared_group)


def check_writers(run_dir: Path, *, shared_group: bool) -> None:
    """A ValueError naming the first file or folder under `run_dir` (itself included) that someone other than this
    user (and, with `shared_group`, its group) can write."""
    for path in _tree(run_dir):
        problem = _foreign_writer(path.lstat(), shared_group=shared_group)
        if problem:
            advice = (
                "chmod -R o-w on the run directory"
                if shared_group
                else "chmod -R go-w on the run directory, or set train.shared_group=true if its group shares it"
            )
            raise ValueError(
                f"{path} {problem}: whoever can write there decides what this run loads, so it does not start."
                f" Make it yours alone ({advice})"
            )


def _tree(run_dir: Path) -> list[Path]:
    """`run_dir` and everything in it; symbolic links are listed, never followed."""
    paths = [run_dir]
    for folder, folders, files in os.walk(run_dir):
        paths.extend(Path(folder) / name for name in (*folders, *files))
    return paths


def _foreign_writer(status: os.stat_result, *, shared_group: bool) -> str | None:
    if stat.S_ISLNK(status.st_mode):
        return None  # a link's own mode means nothing; where it points is checked by whoever follows it
    if status.st_uid != os.geteuid() and not shared_group:
        return f"belongs to another user (uid {status.st_uid})"
    if status.st_mode & stat.S_IWOTH:
        return f"can be written by every user (mode {stat.filemode(status.st_mode)})"
    if status.st_mode & stat.S_IWGRP and not shared_group:
        return f"can be written by the group {_group_name(status.st_gid)} (mode {stat.filemode(status.st_mode)})"
    return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
