"""Procedural, labelled music for the demo and the probes' demo tasks.

Each clip is a short piece in one of the 24 major/minor keys at one tempo: a diatonic chord progression with its
bass line, a melody that leans on chord tones, an arpeggio, and a drum pattern, played by one to four instruments
from a small set of timbres. Its labels are the key (in mir_eval's spelling, e.g. "Eb minor"), the tempo in BPM and
the instruments. Everything is vectorised numpy, deterministic by seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.audio import SAMPLE_RATE, encode_flac

TONICS = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")  # flats, as mir_eval spells keys
MODES = ("major", "minor")
KEYS = tuple(f"{tonic} {mode}" for mode in MODES for tonic in TONICS)
PITCHED = ("piano", "electric_piano", "pluck")  # additive, FM, plucked string
INSTRUMENTS = (*PITCHED, "drums")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
DOMINANT = 4  # scale degree of the chord on the fifth
# How the melody moves: rests, landing on chord tones on strong eighths, held notes; and how often drums join.
REST, CHORD_TONE, HELD, DRUMS = 0.25, 0.7, 0.3, 0.6
# Which drums hit on each of the eight eighths of a bar (a basic rock beat).
DRUM_PATTERN = [("hat", "kick"), ("hat",), ("hat", "snare"), ("hat", "kick"), ("hat", "kick"), ("hat",)]
DRUM_PATTERN += [("hat", "snare"), ("hat",)]
# Progressions as scale degrees (0 = tonic), one chord per bar.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (5, 3, 0, 4), (1, 4, 0, 0), (0, 5, 3, 4)),
    "minor": ((0, 5, 3, 4), (0, 3, 4, 0), (0, 6, 5, 4), (0, 3, 6, 4), (5, 6, 0, 4)),  # V with the leading tone
}


@dataclass(frozen=True)
class Note:
    start: float  # seconds
    duration: float
    midi: float
    velocity: float


def midi_to_hz(midi: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69) / 12)


def _envelope(samples: int, *, attack: float, decay: float) -> np.ndarray:
    """Linear attack, exponential decay, and a 5 ms release so notes never click."""
    t = np.arange(samples) / SAMPLE_RATE
    env = np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0.0) / decay)
    release = min(samples, int(0.005 * SAMPLE_RATE))
    env[samples - release :] *= np.linspace(1.0, 0.0, release)
    return env


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


VOICES = {"piano": _piano, "electric_piano": _electric_piano, "pluck": _pluck}


def _render(notes: list[Note], voice: str, total: int) -> np.ndarray:
    """Notes repeat (progressions cycle, arpeggios loop), so each distinct (pitch, length) is synthesised once."""
    track = np.zeros(total)
    sounds: dict[tuple[float, int], np.ndarray] = {}
    for note in notes:
        start = int(note.start * SAMPLE_RATE)
        samples = min(int(note.duration * SAMPLE_RATE), total - start)
        if samples <= 0:
            continue
        if (note.midi, samples) not in sounds:
            sounds[note.midi, samples] = VOICES[voice](float(midi_to_hz(note.midi)), samples)
        track[start : start + samples] += note.velocity * sounds[note.midi, samples]
    return track


@dataclass(frozen=True)
class Piece:
    key: str
    tonic: int  # pitch class, 0 = C
    mode: str
    tempo: float  # beats per minute
    instruments: tuple[str, ...]

    @property
    def beat(self) -> float:
        return 60.0 / self.tempo

    def degree_to_midi(self, degree: int, octave: int) -> int:
        scale = SCALES[self.mode]
        return 12 * (octave + 1) + self.tonic + scale[degree % 7] + 12 * (degree // 7)

    def chord(self, root_degree: int, octave: int) -> list[int]:
        notes = [self.degree_to_midi(root_degree + step, octave) for step in (0, 2, 4)]
        if self.mode == "minor" and root_degree % 7 == DOMINANT:
            notes[1] += 1  # harmonic minor: the dominant chord is major, its third the leading tone
        return notes


def _choose_piece(rng: np.random.Generator) -> Piece:
    key_index = int(rng.integers(len(KEYS)))
    count = int(rng.integers(1, 5))
    pitched = [str(name) for name in rng.choice(PITCHED, size=min(count, len(PITCHED)), replace=False)]
    # At least one pitched instrument carries the harmony; drums join when there is room for them.
    instruments = [*pitched[: count - 1], "drums"] if count > 1 and rng.random() < DRUMS else pitched[:count]
    return Piece(
        key=KEYS[key_index],
        tonic=key_index % 12,
        mode=MODES[key_index // 12],
        tempo=float(rng.integers(70, 161)),
        instruments=tuple(instruments),
    )


def _parts(piece: Piece, seconds: float, rng: np.random.Generator) -> dict[str, list[Note]]:
    """Chords + bass, melody and arpeggio notes, one list per part."""
    bar = 4 * piece.beat
    progression = PROGRESSIONS[piece.mode][int(rng.integers(len(PROGRESSIONS[piece.mode])))]
    chords, melody, arpeggio = [], [], []
    degree = 7  # the melody starts on the tonic an octave up
    for bar_index in range(int(np.ceil(seconds / bar))):
        root = progression[bar_index % len(progression)]
        start = bar_index * bar
        chords += [Note(start, bar, midi, 0.18) for midi in piece.chord(root, octave=4)]
        chords.append(Note(start, bar, piece.degree_to_midi(root, octave=2), 0.35))
        for step in range(8):  # eighth notes; rests and held notes make the rhythm
            if rng.random() < REST:
                continue
            chord_tones = [root + 7, root + 9, root + 11]
            on_strong_beat = step % 2 == 0
            if on_strong_beat and rng.random() < CHORD_TONE:
                degree = int(min(chord_tones, key=lambda tone: abs(tone - degree)))
            else:
                degree = int(np.clip(degree + rng.choice([-2, -1, 1, 2]), 4, 14))
            length = piece.beat / 2 * (2 if rng.random() < HELD else 1)
            melody.append(Note(start + step * piece.beat / 2, length, piece.degree_to_midi(degree, 4), 0.3))
        pattern = piece.chord(root, octave=3)
        arpeggio += [
            Note(start + i * piece.beat / 2, piece.beat / 2, pattern[[0, 1, 2, 1][i % 4]], 0.16) for i in range(8)
        ]
    return {"chords": chords, "melody": melody, "arpeggio": arpeggio}


def _drum_track(piece: Piece, total: int, rng: np.random.Generator) -> np.ndarray:
    track = np.zeros(total)
    sounds = {kind: _drum(kind, int(0.4 * SAMPLE_RATE), rng) for kind in ("kick", "snare", "hat")}
    eighth = piece.beat / 2
    for step in range(int(total / SAMPLE_RATE / eighth) + 1):
        start = int(step * eighth * SAMPLE_RATE)
        for kind in DRUM_PATTERN[step % len(DRUM_PATTERN)]:
            sound = sounds[kind][: total - start]
            track[start : start + sound.size] += sound * (0.3 if kind == "hat" else 0.8)
    return track


def generate(seed: int, seconds: float = 30.0) -> tuple[np.ndarray, dict[str, Any]]:
    """One clip: (float32 mono audio at 16 kHz, labels {"key", "tempo", "instruments"})."""
    rng = np.random.default_rng(seed)
    piece = _choose_piece(rng)
    total = int(seconds * SAMPLE_RATE)
    parts = _parts(piece, seconds, rng)
    pitched = [name for name in piece.instruments if name != "drums"]
    roles = ("chords", "melody", "arpeggio")  # the first pitched instrument plays chords, the next the melody, ...
    mix = np.zeros(total)
    for voice, role in zip(pitched, roles, strict=False):
        mix += _render(parts[role], voice, total)
    if len(pitched) == 1:  # a solo instrument plays the melody over its chords
        mix += _render(parts["melody"], pitched[0], total)
    if "drums" in piece.instruments:
        mix += _drum_track(piece, total, rng)
    audio = (0.5 * mix / max(np.abs(mix).max(), 1e-6)).astype(np.float32)
    labels = {"key": piece.key, "tempo": piece.tempo, "instruments": sorted(piece.instruments)}
    return audio, labels


def write_demo_corpus(folder: str | Path, clips: int, *, seed: int = 0, seconds: float = 30.0) -> list[Path]:
    """`clips` FLAC files with sidecar JSON labels, which `music2vec shard` carries into each clip's record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(clips):
        audio, labels = generate(seed * 1_000_003 + index, seconds)
        path = folder / f"demo{index:05d}.flac"
        path.write_bytes(encode_flac(audio))
        path.with_suffix(".json").write_text(json.dumps(labels, sort_keys=True) + "\n")
        paths.append(path)
    return paths
