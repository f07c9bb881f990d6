"""Span masks: our vectorised `span_mask` vs a direct per-sample port of fairseq's 2022 `compute_mask_indices` loop.

Both are run on the same shapes in this process; the statistics (masked fraction, equal counts) are printed beside
the times so that "faster" can be seen to mean "the same masks, drawn faster".

    python bench/masking.py                             # the paper's 5 s crops per GPU: 96 x 249 frames
    python bench/masking.py --batch 16 --frames 1499    # its 30 s clips per GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from data import span_mask


def fairseq_loop(batch: int, frames: int, *, mask_prob: float, span: int, min_spans: int) -> np.ndarray:
    """fairseq c71870f3 compute_mask_indices for static spans, no padding, require_same_masks, no mask_dropout."""
    mask = np.full((batch, frames), False)
    num_mask = max(min_spans, int(mask_prob * frames / float(span) + np.random.rand()))  # noqa: NPY002
    mask_idcs = []
    for _ in range(batch):
        lengths = np.full(num_mask, span)
        min_len = min(lengths)
        if frames - min_len <= num_mask:
            min_len = frames - num_mask - 1
        mask_idc = np.random.choice(frames - min_len, num_mask, replace=False)  # noqa: NPY002
        mask_idc = np.asarray([mask_idc[j] + offset for j in range(len(mask_idc)) for offset in range(lengths[j])])
        mask_idcs.append(np.unique(mask_idc[mask_idc < frames]))
    min_len = min(len(m) for m in mask_idcs)
    for i, masked in enumerate(mask_idcs):
        kept = np.random.choice(masked, min_len, replace=False) if len(masked) > min_len else masked  # noqa: NPY002
        mask[i, kept] = True
    return mask


def measure(makers: dict[str, Callable[[], np.ndarray]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per maker: (median seconds per call, mean masked fraction, share of batches with equal counts per row).

    Calls alternate between the makers so that load from elsewhere on the machine hits them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in makers}
    fractions: dict[str, list[float]] = {name: [] for name in makers}
    equal = dict.fromkeys(makers, 0)
    for _ in range(repeats):
        for name, make in makers.items():
            started = time.perf_counter()
            mask = make()
            times[name].append(time.perf_counter() - started)
            fractions[name].append(mask.mean())
            counts = mask.sum(axis=1)
            equal[name] += bool((counts == counts[0]).all())
    return {
        name: (statistics.median(times[name]), float(np.mean(fractions[name])), equal[name] / repeats)
        for name in makers
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=96)  # 5 s crops: 63 min of audio / 8 GPUs / 5 s
    parser.add_argument("--frames", type=int, default=249)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    params = {"mask_prob": 0.65, "span": 10, "min_spans": 1}
    np.random.seed(0)  # noqa: NPY002 - fairseq draws from numpy's global state
    rng = np.random.default_rng(0)
    results = measure(
        {
            "ours (vectorised)": lambda: span_mask(args.batch, args.frames, rng=rng, **params),
            "fairseq loop": lambda: fairseq_loop(args.batch, args.frames, **params),
        },
        args.repeats,
    )
    print(f"span masks, batch {args.batch} x {args.frames} frames, {args.repeats} batches each")
    for name, (seconds, fraction, equal) in results.items():
        print(f"  {name:18} {seconds * 1e3:8.3f} ms/batch  masked {fraction:.4f}  equal counts {equal:.0%}")
    speedup = results["fairseq loop"][0] / results["ours (vectorised)"][0]
    print(f"  ours is {speedup:.1f}x faster (goal >= 10)")


if __name__ == "__main__":
    main()
