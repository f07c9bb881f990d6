"""The demo's synthesiser: three pitched timbres and a drum kit, in vectorised numpy at 16 kHz.

Notes are in seconds and MIDI pitch; `render` plays one part's notes on one voice, `drum_track` plays drum hits.
Each pitch is synthesised once per part, as long as the longest note (at most `LONGEST` seconds, by when every voice
has died away); a note is the beginning of its pitch's sound with a 5 ms release, so it never clicks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data.audio import SAMPLE_RATE

PITCHED = ("piano", "electric_piano", "pluck")  # additive, FM, plucked string
LONGEST = 6.0  # seconds; the slowest decay (1.2 s) is 50 dB down by then
RELEASE = int(0.005 * SAMPLE_RATE)
DRUM_KINDS = ("kick", "snare", "hat")


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    duration: float
    midi: float
    velocity: float


@dataclass(frozen=True)
class Hit:
    start: float  # seconds
    kind: str  # one of DRUM_KINDS
    velocity: float


def midi_to_hz(midi: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69) / 12)


def _envelope(samples: int, *, attack: float, decay: float) -> np.ndarray:
    """Linear attack, exponential decay."""
    t = np.arange(samples) / SAMPLE_RATE
    return np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0.0) / decay)


def _piano(freq: float, samples: int) -> np.ndarray:
    t = np.arange(samples) / SAMPLE_RATE
    harmonics = np.arange(1, 7)[:, None]
    partials = np.sin(2 * np.pi * freq * harmonics * t) / harmonics**1.5 * np.exp(-t * harmonics * 0.8)
    return partials.sum(axis=0) * _envelope(samples, attack=0.005, decay=0.9)


def _electric_piano(freq: float, samples: int) -> np.ndarray:
    """Two-operator FM with a decaying modulation index: bright attack, mellow tail."""
    t = np.arange(samples) / SAMPLE_RATE
    index = 2.5 * np.exp(-t * 4.0)
    return np.sin(2 * np.pi * freq * t + index * np.sin(2 * np.pi * freq * t)) * _envelope(
        samples, attack=0.003, decay=0.7
    )


def _pluck(freq: float, samples: int) -> np.ndarray:
    """A string: upper partials die faster than the fundamental, with a short noise burst for the pick."""
    t = np.arange(samples) / SAMPLE_RATE
    harmonics = np.arange(1, 11)[:, None]
    partials = np.sin(2 * np.pi * freq * harmonics * t) / harmonics * np.exp(-t * harmonics * 2.5)
    pick = np.random.default_rng(round(freq)).standard_normal(samples) * np.exp(-t * 200.0) * 0.3
    return (partials.sum(axis=0) + pick) * _envelope(samples, attack=0.001, decay=1.2)


VOICES = {"piano": _piano, "electric_piano": _electric_piano, "pluck": _pluck}


def _drum(kind: str, samples: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(samples) / SAMPLE_RATE
    noise = rng.standard_normal(samples)
    if kind == "kick":  # a sine whose pitch falls from 150 Hz to 50 Hz
        pitch = 50 + 100 * np.exp(-t * 30)
        return np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE) * np.exp(-t * 8)
    if kind == "snare":  # band-limited noise plus a body tone
        body = np.sin(2 * np.pi * 180 * t) * np.exp(-t * 20)
        return 0.6 * np.convolve(noise, np.ones(4) / 4, mode="same") * np.exp(-t * 18) + 0.4 * body
    return np.diff(noise, prepend=0.0) * np.exp(-t * 60) * 0.35  # hi-hat: differentiated noise is high-passed


def render(notes: Iterable[Note], voice: str, total: int) -> np.ndarray:
    """`total` samples of `notes` played on `voice`; notes reaching past the end are cut there."""
    track = np.zeros(total)
    spans = [(note, int(note.start * SAMPLE_RATE)) for note in notes]
    spans = [(note, start, min(int(note.duration * SAMPLE_RATE), total - start)) for note, start in spans]
    spans = [(note, start, samples) for note, start, samples in spans if samples > 0]
    if not spans:
        return track
    longest = min(max(samples for _, _, samples in spans), int(LONGEST * SAMPLE_RATE))
    sounds = {midi: VOICES[voice](float(midi_to_hz(midi)), longest) for midi in {note.midi for note, _, _ in spans}}
    release = np.linspace(1.0, 0.0, RELEASE)
    for note, start, samples in spans:
        sound = note.velocity * sounds[note.midi][:samples]
        tail = min(RELEASE, sound.size)
        sound[sound.size - tail :] *= release[RELEASE - tail :]
        track[start : start + sound.size] += sound
    return track


def drum_track(hits: Iterable[Hit], total: int, rng: np.random.Generator) -> np.ndarray:
    track = np.zeros(total)
    sounds = {kind: _drum(kind, int(0.4 * SAMPLE_RATE), rng) for kind in DRUM_KINDS}
    for hit in hits:
        start = int(hit.start * SAMPLE_RATE)
        if start >= total:
            continue
        sound = sounds[hit.kind][: total - start]
        track[start : start + sound.size] += hit.velocity * sound
    return track
