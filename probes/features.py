"""Frozen features: every hidden state of a checkpoint's encoder, mean-pooled over each 30 s window of a file.

As MARBLE extracts them (spec §8.2) and as pretraining saw audio (spec §9, items 8 and 9): a file is decoded to 16
kHz mono, normalised over the whole file, cut into 30 s non-overlapping windows (a last window under 1 s is
dropped; a task can ask for whole windows only), and each window goes through the encoder alone, so nothing is
padded. Features are cached per (checkpoint weights, task): trying another head never extracts twice.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.audio import SAMPLE_RATE, clip_stats, decode_file
from model import Data2VecAudio, load_hf
from model.hf import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from probes.tasks import Example, Task

WINDOW_SECONDS = 30.0
MIN_WINDOW_SECONDS = 1.0


@dataclass(frozen=True)
class Features:
    """One row per window: `values[w]` is (hidden states, dim), `example[w]` the index of its file."""

    values: torch.Tensor  # (window, layer, dim) float32; layer 0 is the transformer's input, as in HF
    example: torch.Tensor  # (window,) int64


def model_folder(checkpoint: Path) -> Path:
    """The Hugging Face folder behind CHECKPOINT: itself, or for a run's checkpoints/step_N its exports/step_N."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file():
        return checkpoint
    if checkpoint.parent.name == "checkpoints":
        export = checkpoint.parent.parent / "exports" / checkpoint.name
        if (export / "config.json").is_file():
            return export
    raise FileNotFoundError(
        f"{checkpoint}: not an export folder, a run's checkpoints/step_N (with exports/step_N beside it), or a"
        " Hugging Face Data2VecAudioModel folder (config.json + weights)"
    )


def weights_digest(folder: Path) -> str:
    """Identifies the weights themselves, so a cache survives moving or renaming the checkpoint."""
    weights = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / LEGACY_WEIGHTS_NAME
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "music2vec" / "features"


def task_features(
    checkpoint: Path, task: Task, examples: list[Example], *, cache: Path | None = None, progress: bool = True
) -> Features:
    """The features of every example, from the cache or extracted now (on the GPU when there is one)."""
    folder = model_folder(checkpoint)
    path = (cache or default_cache()) / weights_digest(folder) / f"{task.name}.safetensors"
    files = [str(example.path) for example in examples]
    identity = _identity(files, task.min_window_seconds)
    # this task's entry, or another task's over the same files and windows (the demo tasks share their audio)
    others = sorted(stored for stored in path.parent.glob("*.safetensors") if stored != path)
    for stored_path in [path, *others]:
        if stored_path.is_file() and _stored_identity(stored_path) == identity:
            stored = load_file(stored_path)
            return Features(stored["values"], stored["example"])
    encoder = load_hf(folder)
    features = extract(encoder, files, min_window_seconds=task.min_window_seconds, progress=progress, desc=task.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    tensors = {"values": features.values, "example": features.example, "files": _identity_tensor(identity)}
    save_file(tensors, partial)
    partial.rename(path)  # a killed extraction leaves no cache entry that looks complete
    return features


@torch.inference_mode()
def extract(
    encoder: Data2VecAudio,
    files: list[str],
    *,
    min_window_seconds: float = MIN_WINDOW_SECONDS,
    windows_per_batch: int = 8,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Every window of every file; a file's full 30 s windows go through the encoder together, its shorter last
    window alone, so a batch never holds padding."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval()
    values, owners = [], []
    for index, file in enumerate(tqdm(files, desc=desc, unit="file", disable=not progress)):
        cut = windows(normalized(decode_file(file).audio), min_window_seconds)
        for batch in _equal_length_batches(cut, windows_per_batch):
            hidden = encoder(torch.from_numpy(np.stack(batch)).to(device), None).hidden_states
            values += torch.stack([state.mean(dim=1) for state in hidden], dim=1).float().cpu()  # (window, layer, dim)
            owners += [index] * len(batch)
    if not values:
        raise ValueError(f"no file had {min_window_seconds} s of audio to extract features from")
    return Features(torch.stack(values), torch.tensor(owners, dtype=torch.int64))


def normalized(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole file, exactly as the loader normalises clips for pretraining."""
    mean, scale = clip_stats(audio)
    return ((audio - mean) * scale).astype(np.float32)


def windows(audio: np.ndarray, min_window_seconds: float = MIN_WINDOW_SECONDS) -> list[np.ndarray]:
    size, minimum = round(WINDOW_SECONDS * SAMPLE_RATE), round(min_window_seconds * SAMPLE_RATE)
    return [audio[start : start + size] for start in range(0, len(audio), size) if len(audio) - start >= minimum]


def _equal_length_batches(cut: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    batches: list[list[np.ndarray]] = []
    for window in cut:
        if batches and len(batches[-1]) < size and len(batches[-1][0]) == len(window):
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


def _identity(files: list[str], min_window_seconds: float) -> str:
    """What makes two extractions the same: the files, in order, and which windows were kept."""
    return hashlib.sha256("\n".join([*files, f"min_window_seconds={min_window_seconds}"]).encode()).hexdigest()


def _identity_tensor(identity: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(identity.encode()), dtype=torch.uint8).clone()


def _stored_identity(path: Path) -> str:
    """The identity a cache entry was written with, read without loading its features."""
    with safe_open(path, framework="pt") as stored:
        return _identity_of({"files": stored.get_tensor("files")}) if "files" in stored.keys() else ""  # noqa: SIM118 - no __contains__


def _identity_of(stored: dict[str, torch.Tensor]) -> str:
    return bytes(stored["files"].tolist()).decode() if "files" in stored else ""
