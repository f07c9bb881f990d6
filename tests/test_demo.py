"""Demo music: rendered compositions, deterministic, labelled, and in the key its label says."""

import json
import tarfile

import numpy as np
from music21 import chord, stream, tie

from data import ShardParams, write_shards
from data.demo import INSTRUMENTS, KEYS, PITCHED, POOLS, folk_tunes, generate, write_demo_corpus
from data.scores import ScoreNote, harmonise, load_work, part_notes, triad, tune_numbers

# Krumhansl-Kessler key profiles, C major and C minor.
MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def chroma(audio: np.ndarray, rate: int = 16_000) -> np.ndarray:
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / rate)
    audible = (freqs > 60) & (freqs < 2000)
    pitch_class = np.round(12 * np.log2(freqs[audible] / 440.0) + 69).astype(int) % 12
    return np.bincount(pitch_class, weights=power[audible], minlength=12)


def estimate_key(audio: np.ndarray) -> str:
    """Krumhansl-Schmuckler: the key whose rotated profile correlates best with the clip's chroma."""
    profile = chroma(audio)
    scores = [np.corrcoef(np.roll(p, tonic), profile)[0, 1] for p in (MAJOR, MINOR) for tonic in range(12)]
    return KEYS[int(np.argmax(scores))]  # KEYS lists the 12 major keys from C, then the 12 minor ones


def test_same_seed_same_clip_and_labels():
    audio, labels = generate(5, seconds=4.0)
    again, labels_again = generate(5, seconds=4.0)
    assert np.array_equal(audio, again)
    assert labels == labels_again
    assert not np.array_equal(audio, generate(6, seconds=4.0)[0])


def test_labels_are_well_formed_and_cover_the_label_space():
    seen_keys, seen_modes, seen_instruments, works = set(), set(), set(), set()
    for seed in range(40):
        audio, labels = generate(seed, seconds=2.0, pool="probe")
        assert audio.dtype == np.float32
        assert audio.shape == (32_000,)
        assert 0.1 < np.abs(audio).max() <= 0.5
        assert labels["key"] in KEYS
        assert 70 <= labels["tempo"] <= 160
        assert 1 <= len(labels["instruments"]) <= 4
        assert set(labels["instruments"]) <= set(INSTRUMENTS)
        assert set(labels["instruments"]) & set(PITCHED)  # someone always plays the tune
        seen_keys.add(labels["key"])
        seen_modes.add(labels["key"].split()[1])
        seen_instruments.update(labels["instruments"])
        works.add(labels["work"])
    assert len(seen_keys) >= 14
    assert seen_modes == {"major", "minor"}
    assert seen_instruments == set(INSTRUMENTS)
    assert len(works) >= 35  # a corpus of tunes, not a handful


def test_a_standard_key_finder_hears_the_labelled_key():
    """The label is the key the score declares, transposed; a key finder that knows nothing of the score agrees."""
    seeds = range(40)
    clips = (generate(seed, 10.0, pool="probe") for seed in seeds)
    hits = sum(estimate_key(audio) == labels["key"] for audio, labels in clips)
    assert hits / len(seeds) >= 0.7  # chance is 1/24; relative major/minor confusions make up most misses


def test_the_pools_share_no_work_and_leave_the_bach_chorales_out():
    pretraining, probe = (
        {(book, number) for book in POOLS[name].folk for number in tune_numbers(book)}
        for name in ("pretraining", "probe")
    )
    assert len(pretraining) > 500
    assert len(probe) > 500
    assert not {number for _, number in pretraining} & {number for _, number in probe}  # O'Neill's tune numbers
    assert not POOLS["probe"].quartets
    splits = [set(folk_tunes(POOLS[f"probe_{split}"])) for split in ("train", "valid", "test")]
    assert sum(map(len, splits)) == len(set.union(*splits)) == len(folk_tunes(POOLS["probe"]))  # no tune in two
    sources = [*POOLS["pretraining"].quartets, *POOLS["pretraining"].folk, *POOLS["probe"].folk]
    assert not [source for source in sources if "bach" in source.lower()]


def test_a_clip_plays_the_work_its_label_names_in_the_labelled_key():
    """Of the 12 transpositions of the named work's notes, the clip's chroma matches the one its key label implies."""
    for seed in range(6):
        audio, labels = generate(seed, seconds=8.0, pool="probe")
        work = load_work(labels["work"])
        assert labels["key"].split()[1] == work.mode
        labelled_shift = (KEYS.index(labels["key"]) - KEYS.index(work.key)) % 12
        notes = [*work.melody, *work.bass, *(note for part in work.accompaniment for note in part)]
        histogram = np.bincount([note.midi % 12 for note in notes], [note.duration for note in notes], minlength=12)
        fit = [np.corrcoef(np.roll(histogram, shift), chroma(audio))[0, 1] for shift in range(12)]
        assert int(np.argmax(fit)) == labelled_shift, (labels, fit)


def test_the_harmonisation_vamps_the_triad_under_the_melody_and_ends_on_the_tonic():
    c_major = [(60, 64, 67), (65, 69, 72), (67, 71, 74), (64, 67, 72)]  # I, IV, V, then I again but not last
    melody = tuple(
        ScoreNote(4.0 * bar + beat, 1.0, tones[beat % 3]) for bar, tones in enumerate(c_major) for beat in range(4)
    )
    chords, roots = harmonise(melody, (0.0, 4.0, 8.0, 12.0), 16.0, tonic=0, mode="major", beat=1.0)
    in_bar = [[note for note in chords if 4 * bar <= note.onset < 4 * bar + 4] for bar in range(4)]
    assert [sorted({note.midi % 12 for note in notes}) for notes in in_bar] == [
        [0, 4, 7],
        [0, 5, 9],
        [2, 7, 11],
        [0, 4, 7],
    ]
    assert [note.onset for note in roots] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]  # "oom" on beats 1 and 3
    assert [note.midi % 12 for note in roots] == [0, 0, 5, 5, 7, 7, 0, 0]
    assert sorted({note.onset % 4 for note in chords}) == [1.0, 3.0]  # "pah" on beats 2 and 4
    waltz = harmonise(melody[:3], (0.0,), 3.0, tonic=0, mode="major", beat=1.0)
    assert [note.onset for note in waltz[1]] == [0.0]  # oom-pah-pah
    assert sorted({note.onset for note in waltz[0]}) == [1.0, 2.0]
    pickup = harmonise(melody[:1], (0.0, 1.0), 5.0, tonic=0, mode="major", beat=1.0)  # one beat before the bar
    assert [note.onset for note in pickup[1]] == [1.0, 3.0]  # the downbeat is after the pickup
    assert triad(tonic=9, mode="minor", root_degree=4) == (4, 8, 11)  # E major in A minor: the leading tone G#


def test_a_tie_joins_the_notes_of_one_pitch_only():
    """O'Neill's 6 opens `G-E`: a tie written between two pitches, so both sound. In a chord, only the tied pitch
    holds on."""
    opening = load_work("oneills1850/0001-0050.abc#6").melody[:2]
    assert opening == (ScoreNote(0.0, 0.5, 67), ScoreNote(0.5, 0.5, 64))
    first, second = chord.Chord(["C4", "E4"]), chord.Chord(["C4", "G4"])
    first.notes[0].tie, second.notes[0].tie = tie.Tie("start"), tie.Tie("stop")
    part = stream.Part()
    part.append([first, second])
    assert part_notes(part) == (ScoreNote(0.0, 2.0, 60), ScoreNote(0.0, 1.0, 64), ScoreNote(1.0, 1.0, 67))


def test_labels_travel_into_the_shard_records(tmp_path):
    paths = write_demo_corpus(tmp_path / "demo", clips=2, seed=1, seconds=6.0)
    expected = {str(p.resolve()): json.loads(p.with_suffix(".json").read_text()) for p in paths}
    write_shards(
        [str(tmp_path / "demo")], tmp_path / "shards", ShardParams(clip_seconds=6, min_seconds=5), progress=False
    )
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {r["source"]: r["labels"] for r in records} == expected
