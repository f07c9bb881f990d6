"""Labelled demo music: real compositions from music21's corpus, played by the project's synthesiser.

Each clip is an excerpt of a work: a string quartet movement by Haydn or Mozart (its harmony and voice leading as
written) or an Irish tune from O'Neill's "Music of Ireland" (1903) over a harmonisation (`data/scores.py`),
transposed to any of the 24 major and minor keys, at a tempo of 70 to 160 beats per minute, played by one to three
of the synthesiser's instruments (melody, inner parts, bass), with a drum kit under some folk tunes. Its labels are
exact: the key the score declares, transposed (mir_eval's spelling, e.g. "Eb minor"), the tempo in beats per
minute (quarter notes, dotted quarters in compound meters), the instruments, and the work.

Two pools of works that share none: `pretraining` (what `music2vec demo` shards) and `probe` (the demo probe
tasks, split further into `probe_train`, `probe_valid` and `probe_test`). music21's Bach chorales are in neither:
they are kept as held-out evaluation material.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data.audio import SAMPLE_RATE, encode_flac
from data.scores import KEYS, ScoreNote, Work, key_name, load_work, tune_numbers
from data.synth import PITCHED, Hit, Note, drum_track, render

__all__ = ["INSTRUMENTS", "KEYS", "PITCHED", "POOLS", "folk_tunes", "generate", "write_demo_corpus"]

INSTRUMENTS = (*PITCHED, "drums")
TEMPO_RANGE = (70, 160)  # beats per minute, both included
DRUMS = 0.7  # how often a folk tune gets drums
ON_THE_GRID = 1e-9  # quarter notes: a subdivision this close to a beat is on it
# Loudness per role: chords and inner parts are several notes at once, so each is quieter.
VELOCITY = {"melody": 0.3, "accompaniment": 0.14, "bass": 0.3}


@dataclass(frozen=True)
class Pool:
    quartets: tuple[str, ...]  # movements, played from any measure
    folk: tuple[str, ...]  # ABC files of folk tunes, each tune played from its start
    quartet_share: float  # how many clips are quartet excerpts
    # (m, residues): only the tunes whose number modulo m is one of residues, so a pool's splits share no tune
    tune_filter: tuple[int, tuple[int, ...]] | None = None


def _movements(work: str, count: int) -> tuple[str, ...]:
    return tuple(f"{work}/movement{number}.mxl" for number in range(1, count + 1))


def _books(*names: str) -> tuple[str, ...]:
    return tuple(f"oneills1850/{name}.abc" for name in names)


# O'Neill's numbered sections as music21 stores them, split between the pools with no tune in both (music21's files
# that overlap another's numbers are left out).
PRETRAINING_BOOKS = (
    "0051-0100", "0201-0300", "0351-0400", "0487-0500", "0501-0550", "0550-0625", "0626-0635", "0721-0730",
    "0811-0899", "0951-0981", "1031-1115", "1176-1275", "1376-1475", "1556-1624", "1801-1850",
)  # fmt: skip
PROBE_BOOKS = (
    "0001-0050", "0101-0200", "0301-0350", "0401-0486", "0701-0720", "0759-0810", "0900-0950", "1136-1175",
    "1276-1375", "1476-1555", "1625-1700",
)  # fmt: skip
# The quartet movements are those that end in their declared key (a minuet whose score ends with its trio would not).
POOLS = {
    "pretraining": Pool(
        quartets=(
            *(f"haydn/opus1no1/movement{number}.mxl" for number in (1, 3, 4, 5)),
            *(f"haydn/opus74no1/movement{number}.mxl" for number in (1, 2, 4)),
            *_movements("mozart/k155", 3),
            *_movements("mozart/k156", 4),
            *_movements("mozart/k458", 4),
            *(f"mozart/k80/movement{number}.mxl" for number in (1, 2, 4)),
        ),
        folk=_books(*PRETRAINING_BOOKS),
        quartet_share=0.5,
    ),
    "probe": Pool(
        quartets=(),
        folk=_books(*PROBE_BOOKS),
        quartet_share=0.0,
    ),
}
# The demo probe tasks' splits: two thirds of the probe pool's tunes for training heads, a sixth each to choose and
# to test them, no tune in two splits.
PROBE_SPLITS = {"train": (0, 1, 2, 3), "valid": (4,), "test": (5,)}
POOLS |= {
    f"probe_{split}": replace(POOLS["probe"], tune_filter=(6, residues)) for split, residues in PROBE_SPLITS.items()
}


def folk_tunes(pool: Pool) -> list[str]:
    """The pool's folk tunes as load_work sources ("book#number"), after its tune filter."""
    modulus, residues = pool.tune_filter or (1, (0,))
    tunes = [(collection, number) for collection in pool.folk for number in tune_numbers(collection)]
    return [f"{collection}#{number}" for collection, number in tunes if number % modulus in residues]


def _choose_work(pool: Pool, rng: np.random.Generator, songs: list[str]) -> Work:
    """A work of the pool with a major or minor key (modal tunes are drawn again)."""
    for _ in range(100):
        if pool.quartets and rng.random() < pool.quartet_share:
            source = pool.quartets[int(rng.integers(len(pool.quartets)))]
        else:
            source = songs[int(rng.integers(len(songs)))]
        try:
            return load_work(source)
        except ValueError:
            continue
    raise RuntimeError(f"no work with a major or minor key in 100 draws from {pool}")


def _excerpt_start(work: Work, quarters: float, rng: np.random.Generator, from_start: bool) -> float:
    """A measure to start at: any that leaves `quarters` to play (a quartet), or the first (a folk song)."""
    fits = [onset for onset in work.measures if onset + quarters <= work.length]
    return 0.0 if from_start or not fits else float(fits[int(rng.integers(len(fits)))])


def _timed(
    notes: tuple[ScoreNote, ...], work: Work, *, start: float, quarters: float, shift: int, spq: float, velocity: float
) -> list[Note]:
    """Notes from `start` for `quarters`, in seconds and transposed; the work repeats (verses) when it is shorter."""
    timed = []
    repeat = 0.0
    while repeat + work.length - start > 0 and repeat < quarters + start:
        for note in notes:
            onset = note.onset + repeat - start
            if 0 <= onset < quarters:
                timed.append(Note(onset * spq, note.duration * spq, note.midi + shift, velocity))
        repeat += work.length
    return timed


def _drum_hits(work: Work, *, start: float, quarters: float, spq: float) -> list[Hit]:
    """Kick on the downbeat, snare on the other beats of the measure, hi-hats on each half (duple) or third
    (compound) of a beat; a short first measure (a pickup) counts back from its end."""
    hits = []
    full = max(np.diff([*work.measures, work.length]), default=work.length)
    subdivision = work.beat / (3 if work.beat % 1 else 2)
    repeat = 0.0
    while repeat < quarters + start:
        bounds = [*work.measures, work.length]
        for index, (begin, end) in enumerate(itertools.pairwise(bounds)):
            into_measure = full - (end - begin) if index == 0 else 0.0
            position = 0.0
            while begin + position < end - ON_THE_GRID:
                onset = begin + position + repeat - start
                beat, off_beat = divmod(into_measure + position, work.beat)
                if 0 <= onset < quarters:
                    hits.append(Hit(onset * spq, "hat", 0.3))
                    if off_beat < ON_THE_GRID:
                        hits.append(Hit(onset * spq, "kick" if beat == 0 else "snare", 0.8 if beat == 0 else 0.6))
                position += subdivision
        repeat += work.length
    return hits


def _instruments(rng: np.random.Generator, drums: bool) -> tuple[str, ...]:
    count = int(rng.integers(1, len(PITCHED) + 1))
    pitched = tuple(str(name) for name in rng.choice(PITCHED, size=count, replace=False))
    return (*pitched, "drums") if drums else pitched


def _roles(instruments: tuple[str, ...]) -> dict[str, str]:
    """Which instrument plays which role: one plays everything, two split melody from the rest, three each take one."""
    first, *others = [name for name in instruments if name != "drums"]
    accompaniment = others[0] if others else first
    return {"melody": first, "accompaniment": accompaniment, "bass": others[-1] if others else first}


def generate(seed: int, seconds: float = 30.0, pool: str = "pretraining") -> tuple[np.ndarray, dict[str, Any]]:
    """One clip of a work of `pool`: (float32 mono audio at 16 kHz, labels {"key", "tempo", "instruments", "work"})."""
    rng = np.random.default_rng(seed)
    chosen = POOLS[pool]
    work = _choose_work(chosen, rng, folk_tunes(chosen))
    shift = int(rng.integers(-6, 6))  # every tonic is reachable from every key
    tempo = int(rng.integers(TEMPO_RANGE[0], TEMPO_RANGE[1] + 1))
    spq = 60.0 / (tempo * work.beat)  # seconds per quarter note
    quarters = seconds / spq
    is_quartet = work.source in chosen.quartets
    start = _excerpt_start(work, quarters, rng, from_start=not is_quartet)
    instruments = _instruments(rng, drums=not is_quartet and rng.random() < DRUMS)
    total = int(seconds * SAMPLE_RATE)
    mix = np.zeros(total)
    roles = _roles(instruments)
    lines = {"melody": [work.melody], "accompaniment": list(work.accompaniment), "bass": [work.bass]}
    for role, parts in lines.items():
        for part in parts:
            notes = _timed(part, work, start=start, quarters=quarters, shift=shift, spq=spq, velocity=VELOCITY[role])
            mix += render(notes, roles[role], total)
    if "drums" in instruments:
        mix += drum_track(_drum_hits(work, start=start, quarters=quarters, spq=spq), total, rng)
    audio = (0.5 * mix / max(np.abs(mix).max(), 1e-6)).astype(np.float32)
    labels = {
        "key": key_name(work.tonic + shift, work.mode),
        "tempo": float(tempo),
        "instruments": sorted(instruments),
        "work": work.source,
    }
    return audio, labels


def write_demo_corpus(
    folder: str | Path, clips: int, *, seed: int = 0, seconds: float = 30.0, pool: str = "pretraining"
) -> list[Path]:
    """`clips` FLAC files with sidecar JSON labels, which `music2vec shard` carries into each clip's record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(clips):
        audio, labels = generate(seed * 1_000_003 + index, seconds, pool)
        path = folder / f"demo{index:05d}.flac"
        path.write_bytes(encode_flac(audio))
        path.with_suffix(".json").write_text(json.dumps(labels, sort_keys=True) + "\n")
        paths.append(path)
    return paths
