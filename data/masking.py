"""Span masks with fairseq's `compute_mask_indices` semantics (its 2022 version, which Music2Vec trained with).

For a batch without padding, `mask_type="static"`, `no_overlap=False`, `require_same_masks=True`, `mask_dropout=0`:
1) spans per sample = max(min_spans, int(mask_prob * frames / span + U)), U ~ Uniform[0, 1) drawn once per batch;
2) span starts: that many distinct frames drawn uniformly from [0, frames - span) per sample; each span masks `span`
   frames from its start, overlapping spans merge, frames past the end are dropped;
3) every sample keeps a random subset of its masked frames, as many as the least-masked sample has, so all samples
   have the same masked count.
The random draws come from a numpy Generator instead of numpy's global state; the distribution is the same.
"""

from __future__ import annotations

import numpy as np

MIN_FRAMES = 2  # one span start plus one frame to spare, fairseq's smallest workable input


def span_mask(
    batch: int,
    frames: int,
    *,
    mask_prob: float = 0.65,
    span: int = 10,
    min_spans: int = 1,
    rng: np.random.Generator,
) -> np.ndarray:
    """(batch, frames) bool array, True where the student sees the mask embedding."""
    if frames < MIN_FRAMES:
        raise ValueError(f"cannot mask {frames} frame(s): crops must give at least {MIN_FRAMES} frames")
    num_spans = max(min_spans, int(mask_prob * frames / span + rng.random()))
    num_spans = min(num_spans, frames - 1)  # fairseq would fail to draw more distinct starts than there are frames
    start_range = frames - span if frames - span > num_spans else num_spans + 1
    starts = _smallest_keys(_random_keys(rng, (batch, start_range)), num_spans)  # distinct, uniform
    spans = (starts[:, :, None] + np.arange(span)).reshape(batch, -1)
    mask = _true_at(spans, width=frames + span)[:, :frames]  # spans may run past the end: cut there
    return _equalize(mask, rng)


def _equalize(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a uniformly random subset of each row's masked frames, as many as the sparsest row has."""
    keys = _random_keys(rng, mask.shape)
    keys[~mask] = _NEVER
    keep = _smallest_keys(keys, int(mask.sum(axis=1).min()))
    return _true_at(keep, width=mask.shape[1])


def _true_at(columns: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) bool array, True at each row's `columns` (a flat scatter: twice as fast as put_along_axis)."""
    rows = columns.shape[0]
    flat = np.zeros(rows * width, dtype=bool)
    flat[(columns + (np.arange(rows) * width)[:, None]).ravel()] = True
    return flat.reshape(rows, width)


# Random selection by sorting keys: each column gets a random 64-bit key whose low 16 bits are replaced by the
# column index (rows are far shorter than 65,536 frames), so keys never tie and carry their column with them. The
# `count` smallest keys of a row are a uniform random subset of its columns; a linear-time partition of the key
# values finds them, about twice as fast as arg-partitioning.
_COLUMN_BITS = np.uint64(0xFFFF)
_NEVER = np.iinfo(np.uint64).max


def _random_keys(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    bits = rng.random(shape).view(np.uint64)  # the bit patterns of non-negative doubles sort like the doubles
    bits &= ~_COLUMN_BITS
    bits |= np.arange(shape[1], dtype=np.uint64)
    return bits


def _smallest_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """Column indices of the `count` smallest keys of each row, in no particular order."""
    if count == 0:
        return np.zeros((keys.shape[0], 0), dtype=np.int64)
    if count < keys.shape[1]:
        keys = np.partition(keys, count - 1, axis=1)[:, :count]
    return (keys & _COLUMN_BITS).astype(np.int64)
