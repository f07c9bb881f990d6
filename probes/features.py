"""Frozen features: every hidden state of a checkpoint's encoder, mean-pooled over each 30 s window of a file.

As MARBLE extracts them, and as pretraining saw audio: a file is decoded to 16 kHz mono, normalised over the whole
file, and cut into 30 s non-overlapping windows (a last window under 1 s is dropped; a task can ask for whole windows
only). Windows of equal length go through the encoder together, across files, so nothing is padded. Features are
fp32 (bf16 autocast on request, PROBES.md says what it changes) and cached per (checkpoint weights, task, precision):
trying another head never extracts twice.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


FeaturePrecision = Literal["fp32", "bf16"]


def task_features(
    checkpoint: Path,
    task: Task,
    examples: list[Example],
    *,
    cache: Path | None = None,
    precision: FeaturePrecision = "fp32",
    progress: bool = True,
) -> Features:
    """The features of every example, from the cache or extracted now (on the GPU when there is one)."""
    folder = model_folder(checkpoint)
    suffix = "" if precision == "fp32" else f".{precision}"
    path = (cache or default_cache()) / weights_digest(folder) / f"{task.name}{suffix}.safetensors"
    files = [str(example.path) for example in examples]
    identity = _identity(files, task.min_window_seconds, precision)
    # this task's entry, or another task's over the same files and windows (the demo tasks share their audio)
    others = sorted(stored for stored in path.parent.glob("*.safetensors") if stored != path)
    for stored_path in [path, *others]:
        if stored_path.is_file() and _stored_identity(stored_path) == identity:
            stored = load_file(stored_path)
            return Features(stored["values"], stored["example"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_hf(folder).to(device)
    features = extract(
        encoder,
        files,
        min_window_seconds=task.min_window_seconds,
        precision=precision,
        progress=progress,
        desc=task.name,
    )
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
    precision: FeaturePrecision = "fp32",
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Every window of every file, on the device the encoder is on; the encoder is left as it was (in eval mode
    while extracting). Windows of one length go through the encoder together across files (most windows are a
    full 30 s); a batch never holds padding, and no more than twice a batch waits for company (a dataset whose clips
    all differ by a few samples, as MagnaTagATune's do, would otherwise be held in memory whole). `bf16` runs the
    encoder under bf16 autocast and pools in fp32."""
    device = next(encoder.parameters()).device
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # window length -> (window number, window) to encode
    pooled: dict[int, torch.Tensor] = {}  # window number -> (layer, dim)
    owners: list[int] = []
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for index, file in enumerate(tqdm(files, desc=desc, unit="file", disable=not progress)):
                for window in windows(normalized(decode_file(file).audio), min_window_seconds):
                    same_length = pending.setdefault(len(window), [])
                    same_length.append((len(owners), window))
                    owners.append(index)
                    if len(same_length) == windows_per_batch:
                        pooled |= _encode(encoder, pending.pop(len(window)), device)
                    elif sum(map(len, pending.values())) > 2 * windows_per_batch:  # the longest-waiting length goes
                        pooled |= _encode(encoder, pending.pop(next(iter(pending))), device)
            for batch in pending.values():
                pooled |= _encode(encoder, batch, device)
    finally:
        encoder.train(was_training)
    if not owners:
        raise ValueError(f"no file had {min_window_seconds} s of audio to extract features from")
    return Features(torch.stack([pooled[number] for number in range(len(owners))]), torch.tensor(owners))


def _encode(
    encoder: Data2VecAudio, batch: list[tuple[int, np.ndarray]], device: torch.device
) -> dict[int, torch.Tensor]:
    """Every hidden state of each window, mean-pooled over frames in fp32: window number -> (layer, dim) on CPU."""
    audio = torch.from_numpy(np.stack([window for _, window in batch])).to(device, non_blocking=True)
    hidden = encoder(audio, None).hidden_states
    pooled = torch.stack([state.float().mean(dim=1) for state in hidden], dim=1).cpu()  # (window, layer, dim)
    return {number: features for (number, _), features in zip(batch, pooled, strict=True)}


def normalized(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole file, exactly as the loader normalises clips for pretraining."""
    mean, scale = clip_stats(audio)
    return ((audio - mean) * scale).astype(np.float32)


def windows(audio: np.ndarray, min_window_seconds: float = MIN_WINDOW_SECONDS) -> list[np.ndarray]:
    size, minimum = round(WINDOW_SECONDS * SAMPLE_RATE), round(min_window_seconds * SAMPLE_RATE)
    return [audio[start : start + size] for start in range(0, len(audio), size) if len(audio) - start >= minimum]


def _identity(files: list[str], min_window_seconds: float, precision: FeaturePrecision) -> str:
    """What makes two extractions the same: the files, in order, which windows were kept, and the precision."""
    settings = [f"min_window_seconds={min_window_seconds}"]
    if precision != "fp32":  # fp32 entries keep the identity they had before bf16 existed
        settings.append(f"precision={precision}")
    return hashlib.sha256("\n".join([*files, *settings]).encode()).hexdigest()


def _identity_tensor(identity: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(identity.encode()), dtype=torch.uint8).clone()


def _stored_identity(path: Path) -> str:
    """The identity a cache entry was written with, read without loading its features."""
    with safe_open(path, framework="pt") as stored:
        return _identity_of({"files": stored.get_tensor("files")}) if "files" in stored.keys() else ""  # noqa: SIM118 - no __contains__


def _identity_of(stored: dict[str, torch.Tensor]) -> str:
    return bytes(stored["files"].tolist()).decode() if "files" in stored else ""
