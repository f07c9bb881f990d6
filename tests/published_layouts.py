"""Small trees in the published layouts of MagnaTagATune, GTZAN, GiantSteps key and Emomusic: the same folders,
file names, delimiters, quoting, headers and audio formats, with a handful of short clips each.

Every builder returns what the adapter should find, so a test compares the adapter against the tree it wrote.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import soundfile as sf
from conftest import tone

from probes.datasets.magnatagatune import TOP_50

MTT_CORRUPT_CLIP = "35644"  # one of the three clips whose MP3s are unreadable


def write_audio(path: Path, seconds: float, rate: int, seed: int, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, seed=seed, channels=channels), rate)  # format from the suffix: WAV, MP3, AU
    return path


def magnatagatune(root: Path) -> dict[str, dict[str, tuple[str, ...]]]:
    """MTT/annotations_final.csv (tab-separated, every field quoted, 188 tags) and MTT/mp3/<0-f>/<name>.mp3.

    Two clips per folder 0-f, each with 5 of the top-50 tags (3-4 clips per tag) and sometimes one of the 138
    rarer tags (at most 1 clip each), plus the corrupt clip 35644, which must be left out.
    """
    folder = root / "MTT"
    tags = [*TOP_50[::-1], *(f"rare tag {n}" for n in range(138))]  # column order is not frequency order
    rows, expected = [], {"train": {}, "valid": {}, "test": {}}
    for clip in range(32):
        letter = "0123456789abcdef"[clip // 2]
        mp3_path = f"{letter}/artist_{clip}-album-{clip:02d}-track-0-29.mp3"
        chosen = {TOP_50[(5 * clip + k) % 50] for k in range(5)} | ({f"rare tag {clip}"} if clip % 3 == 0 else set())
        rows.append([str(clip + 2), *("1" if tag in chosen else "0" for tag in tags), mp3_path])
        write_audio(folder / "mp3" / mp3_path, 2.0, 16_000, seed=clip)
        split = "train" if letter in "0123456789ab" else "valid" if letter == "c" else "test"
        expected[split][mp3_path] = tuple(tag for tag in TOP_50 if tag in chosen)
    rows.append([MTT_CORRUPT_CLIP, *("1" if tag == TOP_50[0] else "0" for tag in tags), "0/corrupt-0-29.mp3"])
    with (folder / "annotations_final.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerows([["clip_id", *tags, "mp3_path"], *rows])
    return expected


GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")


def gtzan(root: Path) -> dict[str, list[str]]:
    """GTZAN/genres/<genre>/<genre>.000NN.wav (22.05 kHz, 16-bit mono) and GTZAN/<split>_filtered.txt.

    Per genre: 2 train, 1 valid, 1 test track, and one track that no list names (a faulty one, left out).
    """
    folder = root / "GTZAN"
    expected: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for g, genre in enumerate(GTZAN_GENRES):
        for number, split in enumerate(["train", "train", "valid", "test", None]):
            entry = f"{genre}/{genre}.{number:05d}.wav"
            write_audio(folder / "genres" / entry, 2.0, 22_050, seed=10 * g + number)
            if split:
                expected[split].append(entry)
    for split, entries in expected.items():
        (folder / f"{split}_filtered.txt").write_text("".join(f"{entry}\n" for entry in entries))
    return expected


def _jukemir_valid(artist: str) -> bool:
    """JukeMIR's rule, written out independently: sha1 of the lower-case name modulo 116, the last 16 valid."""
    return int(hashlib.sha1(artist.lower().encode(), usedforsecurity=False).hexdigest(), 16) % 116 >= 100


def _artists(valid: bool, count: int) -> list[str]:
    names = (f"DJ {n}" for n in range(10_000))
    return [name for name in names if _jukemir_valid(name) == valid][:count]


def giantsteps(root: Path) -> dict[str, dict[str, str]]:
    """GS/giantsteps-key-dataset-<commit>/annotations/key/<id>.LOFI.key (test, audio in MARBLE's GS/audio) and
    GS/giantsteps-mtg-key-dataset/annotations/{annotations.txt, beatport_metadata.txt} (train and valid, audio in
    the clone's audio/).

    Test tracks are 61 s, so whole 30 s windows give 2 per track. Of the MTG tracks, one has confidence 1 and
    one two keys: both left out. A collaboration of a train artist with a valid one makes the train artist's
    other track valid too.
    """
    folder = root / "GS"
    test_set = folder / "giantsteps-key-dataset-c8cb8aa"
    expected: dict[str, dict[str, str]] = {"train": {}, "valid": {}, "test": {}}
    for n, key in enumerate(["Eb minor", "A major", "F minor", "Db major"]):
        track = str(3000 + n)
        (test_set / "annotations" / "key").mkdir(parents=True, exist_ok=True)
        (test_set / "annotations" / "key" / f"{track}.LOFI.key").write_text(key)
        write_audio(folder / "audio" / f"{track}.LOFI.mp3", 61.0, 16_000, seed=100 + n)
        expected["test"][track] = key
    train_set = folder / "giantsteps-mtg-key-dataset"
    (plain, partner), (valid,) = _artists(False, 2), _artists(True, 1)
    tracks = [  # ID, artists, MANUAL KEY, confidence, split expected
        ("101", plain, "C# minor", "2", "train"),
        ("102", partner, "G major", "2", "valid"),  # partner collaborates with a valid artist on 104
        ("103", plain, "Bb minor", "1", None),  # low confidence
        ("104", f"{partner}, {valid}", "E minor", "2", "valid"),
        ("105", valid, "F minor/Ab major", "2", None),  # two keys
        ("106", valid, "A minor", "2", "valid"),
        ("107", plain, "F# major", "2", "train"),
    ]
    annotations = [["ID", "MANUAL KEY", "C", "GENRE"]]
    metadata = [["ID", "ARTIST", "TITLE", "GENRE"]]
    for track, artists, key, confidence, split in tracks:
        annotations.append([track, key, confidence, "techno"])
        metadata.append([track, artists, f"Track {track}", "techno"])
        if split:
            write_audio(train_set / "audio" / f"{track}.LOFI.mp3", 31.0, 16_000, seed=int(track))
            expected[split][track] = key
    (train_set / "annotations").mkdir(parents=True)
    for name, table in [("annotations.txt", annotations), ("beatport_metadata.txt", metadata)]:
        with (train_set / "annotations" / name).open("w", newline="") as handle:
            csv.writer(handle, delimiter="\t").writerows(table)
    return expected


def emomusic(root: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """EMO/songs_info.csv, EMO/static_annotations.csv and EMO/clips_45seconds/<song_id>.mp3 (44.1 kHz stereo).

    Song ids start at 2 as in the real list; values carry stray spaces as the real CSVs do. 4 songs are in the
    MediaEval 2013 evaluation set (test); the development songs are by artists on either side of the 8:2 hash.
    """
    folder = root / "EMO"
    names = [f"The {_letters(n)} Band" for n in range(500)]  # letters only: the hash ignores digits
    train_artists = [name for name in names if not _emomusic_valid(name)][:6]
    valid_artists = [name for name in names if _emomusic_valid(name)][:3]
    songs = [(a, "development", "train") for a in train_artists] + [(a, "development", "valid") for a in valid_artists]
    songs += [(f"Evaluation {_letters(n)}", "evaluation", "test") for n in range(4)]
    info = [["song_id", "file_name", "Artist", "Song title", "start of the segment (min.sec)",
             "end of the segment (min.sec)", "Genre", "Mediaeval 2013 set"]]  # fmt: skip
    static = [["song_id", "mean_arousal", "std_arousal", "mean_valence", "std_valence"]]
    expected: dict[str, dict[str, tuple[float, float]]] = {"train": {}, "valid": {}, "test": {}}
    for n, (artist, mediaeval_set, split) in enumerate(songs):
        song_id = n + 2
        arousal, valence = round(1 + 0.5 * n, 2), round(8 - 0.4 * n, 2)
        segment = ["0.30", "1.15"]  # min.sec: 45 s from 30 s in
        info.append([str(song_id), f"{song_id}.mp3", f"{artist}\t", f"Song {n}", *segment, "Rock", mediaeval_set])
        static.append([str(song_id), f" {arousal}", "0.9", f" {valence}", "1.1"])
        write_audio(folder / "clips_45seconds" / f"{song_id}.mp3", 2.0, 44_100, seed=200 + n, channels=2)
        expected[split][str(song_id)] = (arousal, valence)
    for name, table in [("songs_info.csv", info), ("static_annotations.csv", static)]:
        with (folder / name).open("w", newline="") as handle:
            csv.writer(handle).writerows(table)
    return expected


def _emomusic_valid(artist: str) -> bool:
    """JukeMIR's rule for Emomusic: lower case, ASCII letters and spaces, sha1 modulo 10, the last 2 valid."""
    cleaned = " ".join("".join(c for c in artist.lower() if c.isascii() and (c.isalpha() or c.isspace())).split())
    return int(hashlib.sha1(cleaned.encode(), usedforsecurity=False).hexdigest(), 16) % 10 >= 8


def _letters(number: int) -> str:
    word = ""
    while True:
        number, digit = divmod(number, 26)
        word = "abcdefghijklmnopqrstuvwxyz"[digit] + word
        if number == 0:
            return word.capitalize()
