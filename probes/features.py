"""Frozen features: every hidden state of a checkpoint's encoder, mean-pooled over each 30 s window of a file.

As MARBLE extracts them, and as pretraining saw audio: a file is decoded to 16 kHz mono, normalised over the whole
file, and cut into 30 s non-overlapping windows (a last window under 1 s is dropped). A task can ask for whole
windows only, each normalised on its own: JukeMIR's and MARBLE's GiantSteps clips. Windows of equal length go
through the encoder together, across files, so nothing is padded. Features are fp32 (bf16 autocast on request,
PROBES.md says what it changes) and cached per (checkpoint weights, task, precision): trying another head never
extracts twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.audio import SAMPLE_RATE, clip_stats, decode_file
from model import Data2VecAudio, load_hf
from model.hf import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from probes.datasets.files import DatasetError
from probes.tasks import Example, Normalise, Protocol, Task
from trainer.layout import export_of

WINDOW_SECONDS = 30.0
MIN_WINDOW_SECONDS = 1.0
# A decoded file can fall a few milliseconds short of its stated length (MP3 padding, resampling): a whole window
# that short still counts, so a 120.0 s track has four, as JukeMIR counts its clips.
WHOLE_WINDOW_SLACK_SECONDS = 0.05


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
    export = export_of(checkpoint)
    if export is not None and (export / "config.json").is_file():
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
    protocol: Protocol = "marble",
) -> Features:
    """The features of every example, from the cache or extracted now (on the GPU when there is one): one row per
    30 s window, or per file when JukeMIR's protocol takes the whole file as its clip. An extraction that stops at a
    bad file keeps what it extracted before it, so the next one, once the file is fixed, starts there."""
    folder = model_folder(checkpoint)
    whole_files = protocol == "jukemir" and task.jukemir_clip == "file"
    suffix = ("" if precision == "fp32" else f".{precision}") + (".clips" if whole_files else "")
    path = (cache or default_cache()) / weights_digest(folder) / f"{task.name}{suffix}.safetensors"
    files = [str(example.path) for example in examples]
    window_seconds = None if whole_files else WINDOW_SECONDS
    identity = _identity(files, task.min_window_seconds, precision, task.normalise, window_seconds)
    # this task's entry, or another task's over the same files and windows (the demo tasks share their audio)
    others = sorted(stored for stored in path.parent.glob("*.safetensors") if stored != path)
    for stored_path in [path, *others]:
        if stored_path.is_file() and _stored_identity(stored_path) == identity:
            stored = load_file(stored_path)
            return Features(stored["values"], stored["example"])
    progress_path = path.with_suffix(".progress")
    done = _load_progress(progress_path, identity, files)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_hf(folder).to(device)

    def keep_progress(features: Features, files_done: int) -> None:
        if done.files + files_done == 0:
            return
        _save(progress_path, _joined(done, features), identity, files[: done.files + files_done])

    rest = extract(
        encoder,
        files[done.files :],
        min_window_seconds=task.min_window_seconds,
        window_seconds=window_seconds,
        normalise=task.normalise,
        precision=precision,
        progress=progress,
        desc=task.name,
        on_failure=keep_progress,
    )
    features = _joined(done, rest)
    _check_finite(features, files, folder)
    _save(path, features, identity, files=None)
    progress_path.unlink(missing_ok=True)
    return features


@dataclass(frozen=True)
class _Progress:
    """The features of the first `files` files of an extraction that stopped."""

    features: Features
    files: int


def _load_progress(path: Path, identity: str, files: list[str]) -> _Progress:
    """What an earlier extraction of the same files kept: its leading files that have not changed since."""
    nothing = _Progress(Features(torch.empty(0), torch.empty(0, dtype=torch.int64)), 0)
    if not path.is_file():
        return nothing
    stored = load_file(path)
    if _identity_of(stored) != identity:
        return nothing
    unchanged = 0
    for file, signature in zip(files, stored["signatures"].tolist(), strict=False):
        if _signature(file) != signature:
            break
        unchanged += 1
    keep = stored["example"] < unchanged
    return _Progress(Features(stored["values"][keep], stored["example"][keep]), unchanged)


def _joined(done: _Progress, more: Features) -> Features:
    """`done`'s features followed by those of the files after them (`more`, numbered from its first file)."""
    if done.files == 0:
        return more
    values = torch.cat([done.features.values, more.values]) if len(more.example) else done.features.values
    return Features(values, torch.cat([done.features.example, more.example + done.files]))


def _save(path: Path, features: Features, identity: str, files: list[str] | None) -> None:
    """A cache entry (`files` None) or an extraction's progress (the files it covers, to tell them unchanged);
    written to a temporary name first, so that no entry looks complete that is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"values": features.values, "example": features.example, "files": _identity_tensor(identity)}
    if files is not None:
        tensors["signatures"] = torch.tensor([_signature(file) for file in files], dtype=torch.int64).reshape(-1, 2)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial)
    partial.rename(path)


def _signature(file: str) -> list[int]:
    """What tells a fixed file from the one that failed: its size and modification time ([-1, -1]: missing)."""
    try:
        status = Path(file).stat()
    except OSError:
        return [-1, -1]
    return [status.st_size, status.st_mtime_ns]


def _check_finite(features: Features, files: list[str], folder: Path) -> None:
    finite = torch.isfinite(features.values).flatten(1).all(dim=1)
    if not finite.all():
        file = files[int(features.example[~finite][0])]
        raise ValueError(
            f"{folder}: its encoder's features of {file} are not finite: the checkpoint's weights overflow on it (a"
            " diverged run, or try --precision fp32); nothing was cached or written"
        )


@torch.inference_mode()
def extract(
    encoder: Data2VecAudio,
    files: list[str],
    *,
    min_window_seconds: float = MIN_WINDOW_SECONDS,
    window_seconds: float | None = WINDOW_SECONDS,
    normalise: Normalise = "file",
    windows_per_batch: int = 8,
    precision: FeaturePrecision = "fp32",
    progress: bool = True,
    desc: str = "features",
    on_failure: Callable[[Features, int], None] | None = None,
) -> Features:
    """Every window of every file, on the device the encoder is on; the encoder is left as it was (in eval mode
    while extracting). Windows of one length go through the encoder together across files (most windows are a
    full 30 s); a batch never holds padding, and no more than twice a batch waits for company (a dataset whose clips
    all differ by a few samples, as MagnaTagATune's do, would otherwise be held in memory whole). `bf16` runs the
    encoder under bf16 autocast and pools in fp32. `window_seconds` None makes each file one window. `normalise` is
    "file" (the whole file, then cut) or "window" (each window on its own). A file that cannot be decoded, or holds
    non-finite samples, is a DatasetError naming it; `on_failure` is then given the features of the files before
    it, and how many."""
    device = next(encoder.parameters()).device
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # window length -> (window number, window) to encode
    pooled: dict[int, torch.Tensor] = {}  # window number -> (layer, dim)
    owners: list[int] = []
    was_training = encoder.training
    encoder.eval()
    index = 0
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            try:
                for index, file in enumerate(tqdm(files, desc=desc, unit="file", disable=not progress)):
                    audio = _decoded(file)
                    for window in normalised_windows(audio, min_window_seconds, normalise, window_seconds):
                        same_length = pending.setdefault(len(window), [])
                        same_length.append((len(owners), window))
                        owners.append(index)
                        if len(same_length) == windows_per_batch:
                            pooled |= _encode(encoder, pending.pop(len(window)), device)
                        elif sum(map(len, pending.values())) > 2 * windows_per_batch:  # the longest-waiting goes
                            pooled |= _encode(encoder, pending.pop(next(iter(pending))), device)
                for batch in pending.values():
                    pooled |= _encode(encoder, batch, device)
            except Exception:
                if on_failure is not None:
                    on_failure(
                        *_encode_files_before(index, pending=pending, pooled=pooled, owners=owners, encoder=encoder)
                    )
                raise
    finally:
        encoder.train(was_training)
    if not owners:
        raise ValueError(f"no file had {min_window_seconds} s of audio to extract features from")
    return Features(torch.stack([pooled[number] for number in range(len(owners))]), torch.tensor(owners))


def _encode_files_before(
    failed: int,
    *,
    pending: dict[int, list[tuple[int, np.ndarray]]],
    pooled: dict[int, torch.Tensor],
    owners: list[int],
    encoder: Data2VecAudio,
) -> tuple[Features, int]:
    """The features of the leading files whose windows are all encoded, and how many files that is: the files
    before the one that failed, their windows still waiting encoded now (unless the encoder itself failed)."""
    device = next(encoder.parameters()).device
    with contextlib.suppress(Exception):  # the encoder itself may be what failed (out of memory)
        for batch in pending.values():
            waiting = [(number, window) for number, window in batch if owners[number] < failed]
            pooled |= _encode(encoder, waiting, device) if waiting else {}
    files = min((owner for number, owner in enumerate(owners) if number not in pooled), default=failed)
    files = min(files, failed)
    numbers = [number for number, owner in enumerate(owners) if owner < files]
    values = torch.stack([pooled[number] for number in numbers]) if numbers else torch.empty(0)
    return Features(values, torch.tensor([owners[number] for number in numbers], dtype=torch.int64)), files


def _decoded(file: str) -> np.ndarray:
    """The file decoded; a DatasetError naming it when it cannot be, or holds non-finite samples."""
    if not Path(file).is_file():
        raise DatasetError(f"{file}: missing; download or unpack the dataset's audio there")
    try:
        audio = decode_file(file).audio
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise DatasetError(f"{file}: cannot be decoded ({error}); download it again, or remove it") from None
    if audio.size == 0:
        raise DatasetError(f"{file}: holds no audio samples; download it again, or remove it from the dataset")
    mean, scale = clip_stats(audio)
    if not np.isfinite(mean + scale):
        raise DatasetError(f"{file}: holds samples that are not finite (NaN or infinity); re-encode it, or remove it")
    return audio


def normalised_windows(
    audio: np.ndarray,
    min_window_seconds: float,
    normalise: Normalise,
    window_seconds: float | None = WINDOW_SECONDS,
) -> list[np.ndarray]:
    """The windows of a decoded file, normalised as the file ("file", as pretraining saw audio) or each window on
    its own ("window")."""
    if normalise == "file":
        return windows(_normalised(audio), min_window_seconds, window_seconds)
    return [_normalised(window) for window in windows(audio, min_window_seconds, window_seconds)]


def _normalised(audio: np.ndarray) -> np.ndarray:
    mean, scale = clip_stats(audio)
    return ((audio - mean) * scale).astype(np.float32)


def _encode(
    encoder: Data2VecAudio, batch: list[tuple[int, np.ndarray]], device: torch.device
) -> dict[int, torch.Tensor]:
    """Every hidden state of each window, mean-pooled over frames in fp32: window number -> (layer, dim) on CPU."""
    audio = torch.from_numpy(np.stack([window for _, window in batch])).to(device, non_blocking=True)
    hidden = encoder(audio, None).hidden_states
    pooled = torch.stack([state.float().mean(dim=1) for state in hidden], dim=1).cpu()  # (window, layer, dim)
    return {number: features for (number, _), features in zip(batch, pooled, strict=True)}


def windows(
    audio: np.ndarray, min_window_seconds: float = MIN_WINDOW_SECONDS, window_seconds: float | None = WINDOW_SECONDS
) -> list[np.ndarray]:
    """Non-overlapping windows (30 s; None: the whole file), the last one kept when it is at least
    `min_window_seconds` long."""
    slack = WHOLE_WINDOW_SLACK_SECONDS if min_window_seconds >= WINDOW_SECONDS else 0.0
    size = len(audio) if window_seconds is None else round(window_seconds * SAMPLE_RATE)
    minimum = round((min_window_seconds - slack) * SAMPLE_RATE)
    if size == 0:
        return []
    return [audio[start : start + size] for start in range(0, len(audio), size) if len(audio) - start >= minimum]


def _identity(
    files: list[str],
    min_window_seconds: float,
    precision: FeaturePrecision,
    normalise: Normalise = "file",
    window_seconds: float | None = WINDOW_SECONDS,
) -> str:
    """What makes two extractions the same: the files, in order, which windows were kept and how they were
    normalised, and the precision."""
    settings = [f"min_window_seconds={min_window_seconds}"]
    if min_window_seconds >= WINDOW_SECONDS:
        settings.append(f"whole_window_slack={WHOLE_WINDOW_SLACK_SECONDS}")
    if normalise != "file":  # entries normalised by file keep the identity they had before windows could be
        settings.append(f"normalise={normalise}")
    if window_seconds is None:
        settings.append("window=file")
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
