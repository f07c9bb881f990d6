"""Checkpoints: DeepSpeed's shards + the teacher + each rank's data and RNG position, then COMPLETE, written last.

    checkpoints/step_000012000/   DeepSpeed files, teacher.safetensors, rank_00000.pt ..., config.yaml, COMPLETE
    exports/step_000012000/       config.json + model.safetensors, loadable by transformers' Data2VecAudioModel

A checkpoint without COMPLETE does not exist: resume, export and probes only ever see complete ones, found by
scanning (DeepSpeed's own `latest` file is not written). Every rank fsyncs what it wrote before COMPLETE is written,
so a COMPLETE checkpoint survives a power cut. COMPLETE describes the checkpoint: its step, the config digest and
world size that wrote it, and the SHA-256 of every file, so that a truncated or altered file is found before
anything is loaded. The newest `keep_last` complete checkpoints are kept, and every one whose step is a multiple
of `keep_every`, forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data.jsonlines import fsync_folder
from trainer.config import ExperimentConfig, load_config, save_config
from trainer.layout import CHECKPOINTS, COMPLETE, CONFIG, EXPORTS, complete_checkpoints, step_of

MARKER_KEYS = ("step", "config_digest", "world_size", "files")  # what COMPLETE says, besides when it was written


class CheckpointError(ValueError):
    """A COMPLETE checkpoint that cannot be resumed from; the message names the file and says why."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def write_marker(folder: Path, content: dict[str, Any]) -> None:
    """COMPLETE, fsynced, and the folder with it: after this returns the checkpoint survives a power cut."""
    marker = folder / COMPLETE
    with marker.open("w") as handle:
        handle.write(json.dumps(content, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_folder(folder)


def make_durable(folder: Path) -> None:
    """fsync every file in `folder`, the folder and its parent: what this rank wrote there survives a power cut.
    Files other nodes wrote are synced by their own ranks; syncing them here too costs little."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    fsync_folder(folder)
    fsync_folder(folder.parent)


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder` but COMPLETE, by name."""
    return {path.name: _sha256(path) for path in sorted(folder.iterdir()) if path.is_file() and path.name != COMPLETE}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path, *, config_digest: str | None) -> None:
    """Check that `folder` holds what its COMPLETE says, or raise CheckpointError naming the file and the reason.
    `config_digest`: the config this run resumes with (None: a config change was allowed)."""
    content = read_marker(folder)
    step, digest, files = content["step"], content["config_digest"], content["files"]
    problems = []
    if step != step_of(folder):
        problems.append(f"it says step {step}, the folder is {folder.name}")
    if config_digest is not None and digest != config_digest:
        problems.append(f"it was written with config digest {digest}, this run's is {config_digest}")
    if problems:
        raise CheckpointError(f"{folder / COMPLETE}: " + "; ".join(problems))
    _check_files(folder, files)


def read_marker(folder: Path) -> dict[str, Any]:
    """What a checkpoint's COMPLETE says (MARKER_KEYS and the time); CheckpointError when it says nothing usable."""
    marker = folder / COMPLETE
    try:
        content = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{marker}: not a valid COMPLETE marker ({error})") from None
    missing = [key for key in MARKER_KEYS if key not in content] if isinstance(content, dict) else list(MARKER_KEYS)
    if missing:
        raise CheckpointError(f"{marker}: not a valid COMPLETE marker (it lacks {', '.join(missing)})")
    return content


def _check_files(folder: Path, expected: dict[str, str]) -> None:
    present = {path.name for path in folder.iterdir() if path.is_file() and path.name != COMPLETE}
    if missing := sorted(set(expected) - present):
        raise CheckpointError(f"{folder / missing[0]}: missing ({len(missing)} file(s) COMPLETE lists are gone)")
    if unlisted := sorted(present - set(expected)):
        raise CheckpointError(f"{folder / unlisted[0]}: not written with this checkpoint (COMPLETE does not list it)")
    for name, digest in expected.items():
        if _sha256(folder / name) != digest:
            raise CheckpointError(f"{folder / name}: its content changed since it was written (truncated or altered)")


def save_config_copy(folder: Path, cfg: ExperimentConfig) -> None:
    """The config that wrote the checkpoint, inside it: the checkpoint describes its own model wherever it is copied,
    and whatever config the run directory holds later."""
    save_config(cfg, folder / CONFIG)


def saved_config(folder: Path) -> ExperimentConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this checkpoint was written before checkpoints carried their config")
    return load_config(path)


def save_teacher(folder: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, folder / "teacher.safetensors")


def load_teacher(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "teacher.safetensors"
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for each kind of damage
        raise unreadable(path, error) from None


def save_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, rank_file(folder, rank))


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = rank_file(folder, rank)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: every rank that wrote the checkpoint leaves its data position there")
    # weights_only: plain containers, numbers and tensors; nothing in a checkpoint may run code when loaded
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError ...
        raise unreadable(path, error) from None


def unreadable(path: str | Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint file that failed to load: refused (it would run code), or damaged."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)  # torch names the first callable it refused
        named = f" (the first: {found.group(1)})" if found else ""
        return CheckpointError(f"{path}: refused: it holds pickled objects that could run code when loaded{named}")
    return CheckpointError(f"{path}: cannot be read ({(text.strip().splitlines() or [type(error).__name__])[0]})")


def prune(run_dir: Path, *, keep_last: int, keep_every: int, current: int) -> None:
    """Delete complete checkpoints (and their exports) beyond the retention rule, and stale incomplete ones.

    `current`: the step of the checkpoint just written, the newest one known to load. Checkpoints past it are
    left alone and do not count as kept: they are ones this run could not load (damaged, or planted), kept for
    inspection, and the checkpoints this run can resume from must not make way for them.
    """
    checkpoints = [(step, folder) for step, folder in complete_checkpoints(run_dir) if step <= current]
    newest = {step for step, _ in checkpoints[-keep_last:]}
    for step, folder in checkpoints:
        if step in newest or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(run_dir / EXPORTS / folder.name, ignore_errors=True)
    for folder in (run_dir / CHECKPOINTS).glob("step_*"):
        step = step_of(folder)
        if step is not None and step < current and not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a save that a crash interrupted
            shutil.rmtree(run_dir / EXPORTS / folder.name, ignore_errors=True)


def free_space(path: Path) -> str:
    """How full the filesystem holding `path` is, for a message about a write that failed (a full disk shows)."""
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    usage = shutil.disk_usage(existing)
    return f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.0f} MiB on its filesystem"


def set_aside(folder: Path) -> None:
    """Make way for a checkpoint about to be written at `folder`'s step: an interrupted save is deleted, a complete
    one that could not be loaded is renamed (never deleted) so that nobody mistakes the new one's files for it."""
    if not folder.exists():
        return
    if (folder / COMPLETE).is_file():
        aside = folder.with_name(f"{folder.name}.unusable-{int(time.time())}")
        folder.rename(aside)
        print(f"{folder}: an unusable checkpoint stood where this run checkpoints now; moved to {aside}", flush=True)
    else:
        shutil.rmtree(folder)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def marker_content(step: int, digest: str, world_size: int, files: dict[str, str]) -> dict[str, Any]:
    return {"step": step, "config_digest": digest, "world_size": world_size, "time": time.time(), "files": files}
