"""Procedural demo music: seconds of audio generated per second of one core (the goal is at least 100x realtime).

Usage: python bench/demo_music.py [--clips N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import time

from data.demo import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever numpy's threads would do
    generate(0, args.seconds)  # warm-up
    started = time.perf_counter()
    for seed in range(args.clips):
        generate(seed, args.seconds)
    elapsed = time.perf_counter() - started
    print(f"{args.clips} clips of {args.seconds:g} s in {elapsed:.2f} s on one core")
    print(f"  {args.clips * args.seconds / elapsed:.0f}x realtime (goal >= 100)")


if __name__ == "__main__":
    main()
