"""Checkpoints: DeepSpeed's shards + the teacher + each rank's data and RNG position, then COMPLETE, written last.

    checkpoints/step_000012000/   DeepSpeed files, teacher.safetensors, rank_00000.pt ..., COMPLETE
    exports/step_000012000/       config.json + model.safetensors, loadable by transformers' Data2VecAudioModel

A checkpoint without COMPLETE does not exist: resume, export and probes only ever see complete ones, found by
scanning (DeepSpeed's own `latest` file is not written). The newest `keep_last` complete checkpoints are kept, and
every one whose step is a multiple of `keep_every`, forever.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from trainer.layout import COMPLETE, STEP_DIR, complete_checkpoints


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
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_teacher(folder: Path, state: dict[str, torch.Tensor]) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    save_file(tensors, folder / "teacher.safetensors")


def load_teacher(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "teacher.safetensors")


def save_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, rank_file(folder, rank))


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = rank_file(folder, rank)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: this checkpoint was written by fewer ranks; resume with the world size that wrote it"
        )
    # weights_only: plain containers, numbers and tensors; nothing in a checkpoint may run code when loaded
    return torch.load(path, map_location="cpu", weights_only=True)


def prune(run_dir: Path, *, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints (and their exports) beyond the retention rule, and stale incomplete ones."""
    checkpoints = complete_checkpoints(run_dir)
    newest = {step for step, _ in checkpoints[-keep_last:]}
    for step, folder in checkpoints:
        if step in newest or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(run_dir / "exports" / folder.name, ignore_errors=True)
    latest = checkpoints[-1][0] if checkpoints else -1
    for folder in (run_dir / "checkpoints").glob("step_*"):
        match = STEP_DIR.fullmatch(folder.name)
        if match and int(match.group(1)) < latest and not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a save that a crash interrupted
            shutil.rmtree(run_dir / "exports" / folder.name, ignore_errors=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def marker_content(step: int, digest: str, world_size: int) -> dict[str, Any]:
    return {"step": step, "config_digest": digest, "world_size": world_size, "time": time.time()}
