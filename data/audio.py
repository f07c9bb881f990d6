"""Waveform basics: decoding any file soundfile reads to 16 kHz mono, FLAC bytes, and whole-clip statistics."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional

SAMPLE_RATE = 16_000
NORMALIZE_EPS = 1e-5  # fairseq's F.layer_norm(wav, wav.shape) default


@dataclass(frozen=True)
class Decoded:
    audio: np.ndarray  # (sample,) float32 mono at SAMPLE_RATE
    original_rate: int
    original_channels: int


def decode_file(path: str | Path) -> Decoded:
    """Decode a whole file (wav, flac, ogg/vorbis, opus, mp3, ...), downmix to mono and resample to 16 kHz.

    Raises soundfile's error for an unreadable file.
    """
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # (sample, channel)
    mono = audio.mean(axis=1)
    return Decoded(resample(mono, rate), rate, audio.shape[1])


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE or audio.size == 0:
        return np.ascontiguousarray(audio, dtype=np.float32)
    resampled = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE)
    return resampled.numpy()


def encode_flac(audio: np.ndarray) -> bytes:
    """16-bit FLAC at 16 kHz; samples beyond full scale (resampling can overshoot) are clipped."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """(contiguous float32 mono audio, sample rate) of FLAC bytes written by `encode_flac`."""
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return (audio.mean(axis=1, dtype=np.float32) if audio.ndim > 1 else audio), rate


def clip_stats(audio: np.ndarray) -> tuple[float, float]:
    """(mean, scale) such that (audio - mean) * scale has zero mean and unit variance over the whole clip.

    fairseq's `normalize: true` (F.layer_norm over the file, eps 1e-5), from one pass for the sum and one BLAS dot
    for the sum of squares. Non-finite samples make both non-finite, so callers can check them here for free.
    """
    mean = float(audio.sum(dtype=np.float64)) / audio.size
    variance = float(np.dot(audio, audio)) / audio.size - mean * mean
    return mean, 1.0 / float(np.sqrt(max(variance, 0.0) + NORMALIZE_EPS))
