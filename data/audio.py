"""Waveform basics: decoding any file soundfile reads to 16 kHz mono, FLAC bytes, and whole-clip statistics."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional

SAMPLE_RATE = 16_000
NORMALIZE_EPS = 1e-5  # fairseq's F.layer_norm(wav, wav.shape) default
LOWPASS_FILTER_WIDTH, ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults, which `resample` uses


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


def decode_blocks(path: str | Path, *, block_seconds: float = 30.0) -> Iterator[Decoded]:
    """`decode_file`'s audio in consecutive pieces of about `block_seconds`, in memory that does not grow with the
    file: a two-hour input costs what one block does. Each block is resampled with enough of its neighbours'
    samples around it that the sinc filter sees what it sees in the whole file; the pieces join to exactly what
    `decode_file` gives. An MP3 is the exception: it is read whole (`_mono_reads` says why)."""
    with sf.SoundFile(path) as source:
        rate, channels = source.samplerate, source.channels
        step_in, step_out = rate // math.gcd(rate, SAMPLE_RATE), SAMPLE_RATE // math.gcd(rate, SAMPLE_RATE)
        block = max(1, round(block_seconds * rate / step_in)) * step_in  # whole resampling periods
        context = 0 if rate == SAMPLE_RATE else (-(-_sinc_width(step_in, step_out) // step_in) + 1) * step_in
        held, held_from, done = np.empty(0, dtype=np.float32), 0, 0  # held[0] is input sample held_from
        for mono, finished in _mono_reads(source, block):
            held = np.concatenate([held, mono])
            end = held_from + len(held)
            upto = end if finished else (end - context) // step_in * step_in  # what has its right context
            if upto > done:
                left, right = max(done - context, 0), min(upto + context, end)
                resampled = resample(held[left - held_from : right - held_from], rate)
                skip = (done - left) // step_in * step_out
                count = -(-(upto - done) * step_out // step_in)
                yield Decoded(resampled[skip : skip + count], rate, channels)
                done = upto
                keep = max(done - context, 0)
                held, held_from = held[keep - held_from :], keep


def _mono_reads(source: sf.SoundFile, block: int) -> Iterator[tuple[np.ndarray, bool]]:
    """The file's samples downmixed, `block` at a time: (samples, whether they are the last). An MP3 comes in one
    read: libsndfile 1.2's MP3 decoder returns wrong samples for a few hundred frames after a read that stops in
    the middle of the file (whole-file reads are exact), so its memory grows with its length as `decode_file`'s."""
    if source.format == "MP3":
        yield source.read(dtype="float32", always_2d=True).mean(axis=1), True
        return
    while True:
        read = source.read(block, dtype="float32", always_2d=True)
        yield read.mean(axis=1), len(read) < block
        if len(read) < block:
            return


def _sinc_width(step_in: int, step_out: int) -> int:
    """How many input samples torchaudio's default sinc kernel reaches beyond its own period (its `width`)."""
    return math.ceil(LOWPASS_FILTER_WIDTH * step_in / (min(step_in, step_out) * ROLLOFF))


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
