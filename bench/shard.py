"""The shard writer's throughput on real music, against decoding alone, and where the rest of its time goes.

On one core, over the same files, each stage adds one step of what `music2vec shard` does to a file:

    decode          the file's samples, downmixed (soundfile), block by block as the writer reads them
    + resample      to 16 kHz (data.audio.decode_blocks: torchaudio's sinc resampler)
    + encode        cut into 30 s clips, each encoded as 16-bit FLAC (data.shards.process_file)
    writer          the whole writer (data.write_shards, one job): the above plus tar shards and the journal

Throughput is audio seconds per second of one core ("x realtime"); the ratio of the writer to decoding alone is the
goal's measure (≥ 0.5). With `soxr` importable, its resampler is timed on the same decoded audio, and both
resamplers' quality is measured on test tones: passband error and how much of an out-of-band tone aliases in.

Usage: python bench/shard.py [SOURCE ...] (default: the Wesnoth soundtrack, Debian's wesnoth-1.16-music)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from data.audio import SAMPLE_RATE, decode_blocks, resample
from data.shards import ShardParams, expand_inputs, process_file, write_shards

DEFAULT_SOURCE = "/usr/share/games/wesnoth/1.16/data/core/music"
BLOCK_SECONDS = 30.0  # what decode_blocks reads at a time


def decode_only(path: str) -> None:
    with sf.SoundFile(path) as source:
        block = round(BLOCK_SECONDS * source.samplerate)
        while len(read := source.read(block, dtype="float32", always_2d=True)):
            read.mean(axis=1)


def decode_and_resample(path: str) -> None:
    for _ in decode_blocks(path):
        pass


def decode_resample_encode(path: str) -> None:
    process_file((0, path, Path(path).stem, ShardParams()))


def timed(stage: Callable[[str], None], paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        stage(path)
    return time.perf_counter() - started


def writer_seconds(paths: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        write_shards(paths, Path(out) / "shards", ShardParams(), jobs=1, progress=False)
        return time.perf_counter() - started


def audio_seconds(paths: list[str]) -> float:
    return sum(sf.info(path).duration for path in paths)


Resampler = Callable[[np.ndarray, int], np.ndarray]  # (mono audio, its rate) -> 16 kHz audio


def soxr_hq() -> Resampler | None:
    """soxr's high-quality resampler; None without soxr."""
    try:
        import soxr
    except ImportError:
        return None
    return lambda audio, rate: soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")


def resample_seconds(paths: list[str], resamplers: dict[str, Resampler]) -> dict[str, float]:
    """Each resampler's time on every file's downmixed audio, each file decoded once (decoding not counted)."""
    totals = dict.fromkeys(resamplers, 0.0)
    for path in paths:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        for name, resampler in resamplers.items():
            started = time.perf_counter()
            resampler(mono, rate)
            totals[name] += time.perf_counter() - started
    return totals


def tone_quality(resampler: Resampler, rate: int = 44_100) -> dict[str, float]:
    """Passband: the worst amplitude error (dB) of tones at 1, 4 and 7 kHz. Alias: the level (dB re the tone) at
    which a 9 kHz tone, above the 8 kHz Nyquist frequency, comes back at its alias (7 kHz)."""
    t = np.arange(rate * 2) / rate
    worst = 0.0
    for frequency in (1_000.0, 4_000.0, 7_000.0):
        out = resampler(np.sin(2 * np.pi * frequency * t).astype(np.float32), rate)
        worst = max(worst, abs(20 * math.log10(_amplitude(out, frequency))))
    aliased = resampler(np.sin(2 * np.pi * 9_000.0 * t).astype(np.float32), rate)
    return {"passband_error_db": worst, "alias_db": 20 * math.log10(max(_amplitude(aliased, 7_000.0), 1e-12))}


def quality_line(quality: dict[str, float]) -> str:
    return f"passband error {quality['passband_error_db']:.2f} dB, 9 kHz aliased at {quality['alias_db']:.1f} dB"


def _amplitude(audio: np.ndarray, frequency: float) -> float:
    """The amplitude of `frequency` in 16 kHz `audio`, away from its edges, by projection on a sine and cosine."""
    middle = audio[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4].astype(np.float64)
    t = np.arange(middle.size) / SAMPLE_RATE
    sine, cosine = np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)
    return 2 * math.hypot(middle @ sine, middle @ cosine) / middle.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", default=[DEFAULT_SOURCE])
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as each of the writer's --jobs processes
    paths = expand_inputs(args.sources)
    if not paths:
        parser.error(f"no audio under {args.sources}")
    seconds = audio_seconds(paths)
    rates = sorted({sf.info(path).samplerate for path in paths})
    print(f"{len(paths)} files, {seconds / 3600:.2f} h of audio at {rates} Hz, one core")

    stages = {
        "decode": timed(decode_only, paths),
        "+ resample": timed(decode_and_resample, paths),
        "+ encode": timed(decode_resample_encode, paths),
        "writer": writer_seconds(paths),
    }
    baseline = stages["decode"]
    for name, spent in stages.items():
        print(f"  {name:<12} {spent:7.1f} s  {seconds / spent:6.0f}x realtime  {baseline / spent:5.2f}x decode-only")
    print(
        f"  time shares of the writer: decode {baseline / stages['writer']:.0%},"
        f" resample {(stages['+ resample'] - baseline) / stages['writer']:.0%},"
        f" encode {(stages['+ encode'] - stages['+ resample']) / stages['writer']:.0%},"
        f" tar and journal {(stages['writer'] - stages['+ encode']) / stages['writer']:.0%}"
    )

    print("resamplers on the same decoded audio (decoding not counted):")
    resamplers = {"torchaudio (ours)": resample} | ({"soxr HQ": other} if (other := soxr_hq()) else {})
    spent = resample_seconds(paths, resamplers)
    for name, resampler in resamplers.items():
        speed = spent["torchaudio (ours)"] / spent[name]
        quality = quality_line(tone_quality(resampler))
        print(f"  {name:<18} {seconds / spent[name]:7.0f}x realtime  {quality}  ({speed:.1f}x ours' speed)")
    if len(resamplers) == 1:
        print("  soxr               not installed (pip install soxr to compare)")


if __name__ == "__main__":
    main()
