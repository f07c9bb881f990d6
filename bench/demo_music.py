"""Demo music: seconds of audio rendered per second of one core (the goal is at least 100x realtime).

Scores are parsed once per work (music21, timed apart: a `write_demo_corpus` call pays it once per work it plays);
the rendering of the clips (choosing an excerpt, transposing, timing, synthesising, mixing) is what is measured.

Usage: python bench/demo_music.py [--clips N] [--seconds S] [--pool pretraining|probe]
"""

from __future__ import annotations

import argparse
import os
import time

from data.demo import POOLS, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--pool", choices=sorted(POOLS), default="pretraining")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever numpy's threads would do
    started = time.perf_counter()
    for seed in range(args.clips):  # the first pass parses every work the clips play
        generate(seed, args.seconds, args.pool)
    first_pass = time.perf_counter() - started
    started = time.perf_counter()
    for seed in range(args.clips):
        generate(seed, args.seconds, args.pool)
    elapsed = time.perf_counter() - started
    audio = args.clips * args.seconds
    print(f"{args.clips} clips of {args.seconds:g} s from the {args.pool} pool on one core")
    print(f"  rendering        {elapsed:.2f} s: {audio / elapsed:.0f}x realtime (goal >= 100)")
    print(f"  with parsing     {first_pass:.2f} s: {audio / first_pass:.0f}x realtime (scores parsed once per work)")


if __name__ == "__main__":
    main()
