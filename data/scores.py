"""Compositions from music21's corpus, reduced to what the demo's synthesiser plays.

A `Work` is a score's parts as notes in quarter-note time, its measures, the beat of its meter and the key the score
declares (MusicXML's key with its mode, ABC's K: field). Scores are parsed from their source files (MusicXML, ABC)
with music21's converter, never from music21's pickle cache: nothing this project loads may run code.

A monophonic folk tune gets a harmonisation: one diatonic triad per measure (the one whose tones cover most of the
measure's melody, the tonic at the end), played as a vamp, so that it carries harmony and a pulse as well as
melody. Polyphonic works play as written.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

TONICS = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")  # flats, as mir_eval spells keys
MODES = ("major", "minor")
KEYS = tuple(f"{tonic} {mode}" for mode in MODES for tonic in TONICS)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
DOMINANT = 4  # scale degree of the chord on the fifth
ARTICULATION = 0.9  # of a beat: the accompaniment's notes are detached
ON_THE_BEAT = 1e-6  # quarter notes: closer than this to a measure's end is its end
# The beat a tempo counts: the dotted quarter of compound meters, else the quarter note, so that one tempo sounds
# alike in every meter (a reel notated in 2/2 at 100 half notes a minute is 200 quarter notes a minute: fast).
COMPOUND_BEAT = 1.5
# How a harmonisation prefers I, IV and V (as fractions of a measure) when other triads fit the melody as well.
PRIMARY_CHORD_BONUS = {0: 0.15, 3: 0.1, 4: 0.1}


@dataclass(frozen=True)
class ScoreNote:
    onset: float  # quarter notes from the start of the work
    duration: float
    midi: int


@dataclass(frozen=True)
class Work:
    source: str  # where in music21's corpus: "haydn/opus74no1/movement3.mxl", "oneills1850/0001-0050.abc#12"
    tonic: int  # pitch class of the declared key, 0 = C
    mode: str  # "major" or "minor"
    beat: float  # quarter notes per beat: 1.5 in compound meters (6/8, 9/8, 12/8, 3/8), else 1 (2/2 as well)
    measures: tuple[float, ...]  # onsets of the measures, in quarter notes
    length: float  # quarter notes
    melody: tuple[ScoreNote, ...]  # the top part
    accompaniment: tuple[tuple[ScoreNote, ...], ...]  # the other parts from the top down, or the harmonisation
    bass: tuple[ScoreNote, ...]  # the lowest part, or the harmonisation's roots

    @property
    def key(self) -> str:
        return key_name(self.tonic, self.mode)


def key_name(tonic: int, mode: str) -> str:
    return f"{TONICS[tonic % 12]} {mode}"


def corpus_root() -> Path:
    import music21

    return Path(music21.__file__).parent / "corpus"


@functools.cache
def tune_numbers(collection: str) -> tuple[int, ...]:
    """The tunes of an ABC collection in music21's corpus, by their X: reference numbers."""
    text = (corpus_root() / collection).read_text(encoding="utf-8", errors="replace")
    return tuple(int(number) for number in re.findall(r"^X:\s*(\d+)", text, flags=re.MULTILINE))


@functools.lru_cache(maxsize=512)
def load_work(source: str) -> Work:
    """A work of music21's corpus: "path" or "path#N" for tune N of an ABC collection. ValueError when it is not in
    a major or minor key (a modal tune) or has no notes."""
    from music21 import converter

    path, _, number = source.partition("#")
    parser = converter.Converter()
    parser.parseFileNoPickle(corpus_root() / path, number=int(number) if number else None, forceSource=True)
    return _reduce(source, parser.stream)


def _reduce(source: str, score) -> Work:  # noqa: ANN001 (a music21 Score; music21 is imported lazily)
    key = next(iter(score.recurse().getElementsByClass("Key")), None)
    if key is None or key.mode not in MODES:
        raise ValueError(f"{source} is in no major or minor key ({key.mode if key is not None else 'none declared'})")
    parts = [notes for notes in (part_notes(part) for part in (score.parts or [score])) if notes]
    if not parts:
        raise ValueError(f"{source} has no notes")
    meter = next(iter(score.recurse().getElementsByClass("TimeSignature")), None)
    beat = COMPOUND_BEAT if meter is not None and meter.beatDuration.quarterLength == COMPOUND_BEAT else 1.0
    first = score.parts[0] if score.parts else score
    measures = tuple(float(m.offset) for m in first.getElementsByClass("Measure")) or (0.0,)
    length = float(score.highestTime)
    tonic, mode = key.tonic.pitchClass, key.mode
    if len(parts) == 1:
        chords, roots = harmonise(parts[0], measures, length, tonic=tonic, mode=mode, beat=beat)
        return Work(source, tonic, mode, beat, measures, length, parts[0], (chords,), roots)
    return Work(source, tonic, mode, beat, measures, length, parts[0], tuple(parts[1:-1]), parts[-1])


def part_notes(part) -> tuple[ScoreNote, ...]:  # noqa: ANN001 (a music21 Part)
    """Every sounding pitch, a chain of notes tied on that pitch as one note; grace notes (no duration) left out.
    Ties are joined here rather than by music21's stripTies, which re-sorts the part at every tie (a third of a
    quartet's parse), leaves some ties inside chords unjoined, and makes a tie written from one pitch to another
    (ABC's `G-E`) one long G, losing the E."""
    notes: list[list[float]] = []  # [onset, duration, midi]
    tied: dict[int, int] = {}  # midi -> the index in `notes` of the note a tie on that pitch carries on
    for element in part.flatten().notes:
        duration = float(element.quarterLength)
        if duration <= 0:
            continue
        ties = [note.tie for note in element.notes] if element.isChord else [element.tie] * len(element.pitches)
        for pitch, tie in zip(element.pitches, ties, strict=True):
            midi = int(pitch.midi)
            kind = tie.type if tie is not None else None
            if kind in ("continue", "stop") and midi in tied:
                index = tied.pop(midi)
                notes[index][1] += duration
            else:
                index = len(notes)
                notes.append([float(element.offset), duration, midi])
            if kind in ("start", "continue"):
                tied[midi] = index
    joined = (ScoreNote(onset, length, int(midi)) for onset, length, midi in notes)
    return tuple(sorted(joined, key=lambda note: (note.onset, note.midi)))


def triad(tonic: int, mode: str, root_degree: int) -> tuple[int, int, int]:
    """Pitch classes of the diatonic triad on a scale degree; in minor the dominant is major (harmonic minor)."""
    scale = SCALES[mode]
    tones = [(tonic + scale[(root_degree + step) % 7]) % 12 for step in (0, 2, 4)]
    if mode == "minor" and root_degree == DOMINANT:
        tones[1] = (tones[1] + 1) % 12
    return tones[0], tones[1], tones[2]


def harmonise(
    melody: tuple[ScoreNote, ...], measures: tuple[float, ...], length: float, *, tonic: int, mode: str, beat: float
) -> tuple[tuple[ScoreNote, ...], tuple[ScoreNote, ...]]:
    """One triad per measure under a melody, played as a folk accompaniment vamps: the root in the bass on the
    downbeat (and mid-measure in an even number of beats), the chord around middle C on the other beats ("oom-pah",
    "oom-pah-pah" in three). Returns (chord notes, bass notes)."""
    chords, roots = [], []
    bounds = [*measures, length]
    full = max(end - start for start, end in itertools.pairwise(bounds))
    beats_per_measure = max(round(full / beat), 1)
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        if end <= start:
            continue
        inside = [note for note in melody if start <= note.onset < end]
        degree = 0 if index == len(bounds) - 2 else _best_degree(inside, tonic, mode, end - start)
        tones = triad(tonic, mode, degree)
        pickup = full - (end - start) if index == 0 else 0.0  # a short first measure ends on the downbeat
        onset = start + (-pickup) % beat
        while onset < end - ON_THE_BEAT:
            number = round((onset - start + pickup) / beat) % beats_per_measure
            held = min(beat, end - onset) * ARTICULATION
            if number == 0 or (number % 2 == 0 and beats_per_measure % 2 == 0):
                roots.append(ScoreNote(onset, held, 36 + tones[0]))  # C2 up to B2
            else:
                chords += [ScoreNote(onset, held, 55 + (tone - 7) % 12) for tone in tones]  # G3 up to F#4
            onset += beat
    return tuple(chords), tuple(roots)


def _best_degree(notes: list[ScoreNote], tonic: int, mode: str, measure: float) -> int:
    def fit(degree: int) -> float:
        tones = triad(tonic, mode, degree)
        covered = sum(note.duration for note in notes if note.midi % 12 in tones)
        return covered / measure + PRIMARY_CHORD_BONUS.get(degree, 0.0)

    return max(range(7), key=fit)
