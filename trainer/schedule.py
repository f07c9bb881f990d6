"""The tri-stage learning-rate schedule of data2vec-audio base, as a pure function of the update count."""

from __future__ import annotations

import math


def tri_stage_lr(
    step: int,
    *,
    peak: float,
    max_updates: int,
    phase_ratio: tuple[float, float, float],
    init_scale: float,
    final_scale: float,
) -> float:
    """Learning rate once `step` optimizer updates are done (fairseq's tri_stage; update n + 1 uses lr(n)).

    For base: 12k warm-up updates, 360k at the peak, 28k of decay, then constant.
    """
    warmup, hold, decay = (int(max_updates * ratio) for ratio in phase_ratio)
    # 1) linear warm-up from init_scale * peak
    if step < warmup:
        return peak * (init_scale + (1.0 - init_scale) * step / warmup)
    # 2) hold at the peak
    step -= warmup
    if step < hold:
        return peak
    # 3) exponential decay to final_scale * peak
    step -= hold
    if step <= decay and decay > 0:
        return peak * math.exp(math.log(final_scale) * step / decay)
    # 4) constant afterwards
    return peak * final_scale
