"""Peak memory of the shard writer on one long input: block-wise decoding against decoding the whole file first.

Each way runs in a fresh process on the same file (44.1 kHz stereo, written block by block so that this script
itself stays small), and reports its peak resident memory; the whole-file way is what the writer did before it
decoded in blocks. Both cut the same 30 s FLAC clips.

Usage: python bench/shard_memory.py [--hours 2] [--folder /tmp]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

RATE, CHANNELS = 44_100, 2


def write_long_file(path: Path, hours: float) -> None:
    """A chord with a slow tremolo and a little noise: music-like, without holding the file in memory."""
    rng = np.random.default_rng(0)
    block = RATE * 60
    with sf.SoundFile(path, "w", RATE, CHANNELS, subtype="PCM_16") as out:
        for minute in range(round(hours * 60)):
            t = (np.arange(block) + minute * block) / RATE
            chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
            mono = 0.3 * chord * (0.75 + 0.25 * np.sin(2 * np.pi * 0.5 * t)) + 0.01 * rng.standard_normal(block)
            out.write(np.stack([mono, 0.9 * mono], axis=1).astype(np.float32))


def measure(way: str, path: Path) -> dict[str, float]:
    """Run one way in a fresh process: its peak memory (MiB), seconds and clips."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--run", way, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout) | {"seconds": time.perf_counter() - started}


def run_one(way: str, path: Path) -> None:
    from data.audio import SAMPLE_RATE, decode_file, encode_flac
    from data.shards import ShardParams, process_file

    params = ShardParams()
    if way == "blocks":
        clips = len(process_file((0, str(path), path.name, params)).samples)
    else:  # the whole file decoded, downmixed and resampled at once, then cut
        audio = decode_file(path).audio
        size = round(params.clip_seconds * SAMPLE_RATE)
        clips = len([encode_flac(audio[start : start + size]) for start in range(0, audio.size, size)])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"peak_mib": peak_mib, "clips": clips}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--folder", default=tempfile.gettempdir(), help="where the long file is written")
    parser.add_argument("--run", nargs=2, metavar=("WAY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_one(args.run[0], Path(args.run[1]))
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "long.wav"
        write_long_file(path, args.hours)
        size = path.stat().st_size / 2**20
        print(f"input: {args.hours:g} h, {RATE} Hz, {CHANNELS} channels, 16-bit WAV, {size:,.0f} MiB")
        whole, blocks = measure("whole", path), measure("blocks", path)
    for name, result in (("whole file (before)", whole), ("blocks (now)", blocks)):
        print(f"  {name:20s} peak {result['peak_mib']:8,.0f} MiB  {result['seconds']:6.1f} s  {result['clips']} clips")
    print(f"  peak memory: blocks / whole file = {blocks['peak_mib'] / whole['peak_mib']:.3f}")
    print(f"  time: blocks / whole file = {blocks['seconds'] / whole['seconds']:.2f}")


if __name__ == "__main__":
    main()
