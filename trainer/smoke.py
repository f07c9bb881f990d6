"""A short pretraining smoke run of the tiny model on synthetic tones: the stand-in for `music2vec demo`.

It exercises the whole model path on CPU in seconds (span masks, student forward/backward, teacher targets, AdamW,
EMA update) without DeepSpeed or data shards. The DeepSpeed trainer replaces it as the demo's main job.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data.masking import span_mask
from model import Music2Vec, preset

SAMPLE_RATE = 16_000


def synthetic_clips(batch: int, seconds: float, rng: np.random.Generator) -> torch.Tensor:
    """Harmonic tones at random pitches with a little noise, each clip normalised to zero mean and unit variance."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 110.0 * 2.0 ** (rng.integers(0, 36, size=(batch, 1, 1)) / 12)  # A2 .. G#5
    harmonics = np.arange(1, 6)[None, :, None]
    clips = (np.sin(2 * math.pi * pitch * harmonics * t) / harmonics).sum(axis=1)
    clips += 0.05 * rng.standard_normal(clips.shape)
    clips = (clips - clips.mean(axis=1, keepdims=True)) / np.sqrt(clips.var(axis=1, keepdims=True) + 1e-5)
    return torch.from_numpy(clips.astype(np.float32))


def smoke_run(*, steps: int = 20, batch: int = 4, seconds: float = 2.0, seed: int = 0) -> list[dict[str, float]]:
    """Train the tiny model for `steps` AdamW steps; one dict of scalars per step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Music2Vec(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    frames = model.cfg.num_frames(int(seconds * SAMPLE_RATE))
    history = []
    for step in range(1, steps + 1):
        audio = synthetic_clips(batch, seconds, rng)
        mask = torch.from_numpy(span_mask(batch, frames, rng=rng))
        loss, metrics = model(audio, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = model.update_teacher(step)
        scalars = {name: value.item() for name, value in metrics.items()}
        history.append({"step": step, "loss": loss.item(), "ema_decay": decay} | scalars)
    return history
