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
    # Distinct starts per row: the first num_spans entries of a random permutation of range(start_range).
    starts = rng.random((batch, start_range)).argsort(axis=1)[:, :num_spans]  # (batch, num_spans)
    frame_index = (starts[:, :, None] + np.arange(span)).reshape(batch, -1)  # (batch, num_spans * span)
    rows = np.broadcast_to(np.arange(batch)[:, None], frame_index.shape)
    inside = frame_index < frames
    mask = np.zeros((batch, frames), dtype=bool)
    mask[rows[inside], frame_index[inside]] = True
    return _equalize(mask, rng)


def _equalize(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a uniformly random subset of each row's masked frames, as many as the sparsest row has."""
    keep = mask.sum(axis=1).min()
    # Masked frames get random keys, unmasked ones +inf: the `keep` smallest keys are a random subset of the masked.
    keys = np.where(mask, rng.random(mask.shape), np.inf)
    chosen = np.argsort(keys, axis=1)[:, :keep]
    equalized = np.zeros_like(mask)
    np.put_along_axis(equalized, chosen, values=True, axis=1)
    return equalized
