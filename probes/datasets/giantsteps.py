"""GiantSteps key (JukeMIR, docs/ALGORITHM.md §10.1): train and valid from the GiantSteps MTG key set, test the
GiantSteps key set, 24 keys, scored with mir_eval's weighted score per song.

Layout under DATA_ROOT (MARBLE's `data/GS`: clones of the two GitHub datasets, with or without a commit suffix):

    GS/giantsteps-key-dataset*/annotations/key/<id>.LOFI.key    "Eb minor"
    GS/giantsteps-mtg-key-dataset*/annotations/annotations.txt  tab-separated: ID, MANUAL KEY, C (confidence), ...
    GS/giantsteps-mtg-key-dataset*/annotations/beatport_metadata.txt   tab-separated: ID, ARTIST, ...
    <either dataset>/audio/<id>.LOFI.mp3, or GS/audio/<id>.LOFI.mp3 as MARBLE downloads them

MTG tracks count only with confidence 2 and a single key (Korzeniowski and Widmer 2018). Their artists are
split 100:16 by name hash, and every collaborator of a valid artist is valid too (two hops), as in JukeMIR.
Tracks are scored in whole 30 s windows only, each normalised on its own, as JukeMIR and MARBLE cut and normalise
their clips (a 120.0 s track has four; the incomplete tail is dropped).
"""

from __future__ import annotations

from pathlib import Path

from data.scores import KEYS
from probes.datasets.files import DatasetError, hash_split, read_table, read_text, require_audio
from probes.tasks import Example, Task

FOLDER = "GS"
TEST_SET, TRAIN_SET = "giantsteps-key-dataset", "giantsteps-mtg-key-dataset"
SHARP_TO_FLAT = {"C#": "Db", "D#": "Eb", "F#": "Gb", "G#": "Ab", "A#": "Bb"}  # mir_eval spells keys with flats

TASKS = {
    "giantsteps_key": Task(
        "giantsteps_key",
        "multiclass",
        KEYS,
        monitor="weighted_score",
        lr=1e-3,
        plateau_patience=5,
        stop_patience=20,
        references={"Music2Vec": {"weighted_score": 0.501}, "Jukebox": {"weighted_score": 0.667}},
        min_window_seconds=30.0,
        normalise="window",
        jukemir_clip="window",
        song_ensembles=("vote", "max_logit", "mean", "mean_softmax"),  # JukeMIR: chosen on validation
    )
}


def examples(_task: Task, data_root: Path) -> list[Example]:  # one task: nothing to choose
    folder = Path(data_root) / FOLDER
    return require_audio([*_train_and_valid(folder), *_test(folder)], folder)


def key_index(text: str, source: str) -> int:
    """The class of a key written as 'Eb minor', 'F# major' or 'f# minor'."""
    tonic, _, mode = text.strip().partition(" ")
    tonic = tonic[:1].upper() + tonic[1:].lower()
    name = f"{SHARP_TO_FLAT.get(tonic, tonic)} {mode.strip().lower()}"
    if name in KEYS:
        return KEYS.index(name)
    raise DatasetError(f"{source}: key {text!r} is not a tonic and major/minor, e.g. 'Eb minor'")


def _test(folder: Path) -> list[Example]:
    dataset = _dataset(folder, TEST_SET)
    annotations = sorted((dataset / "annotations" / "key").glob("*.LOFI.key"))
    if not annotations:
        raise DatasetError(f"{dataset / 'annotations' / 'key'}: no <id>.LOFI.key files; is the dataset cloned?")
    return [
        Example(
            _audio(folder, dataset, key.name.removesuffix(".key")),
            "test",
            key_index(read_text(key, "a key name"), str(key)),
        )
        for key in annotations
    ]


def _train_and_valid(folder: Path) -> list[Example]:
    dataset = _dataset(folder, TRAIN_SET)
    table = dataset / "annotations" / "annotations.txt"
    rows = read_table(table, ["ID", "MANUAL KEY", "C"], delimiter="\t", expected="the MTG key annotations")
    split_of_track = _track_splits(dataset / "annotations" / "beatport_metadata.txt")
    found = []
    for row in rows:
        if row["C"] != "2" or "/" in row["MANUAL KEY"]:  # low confidence, or several keys
            continue
        source = f"{table}, ID {row['ID']}"
        if row["ID"] not in split_of_track:
            raise DatasetError(f"{source}: no row with this ID in beatport_metadata.txt")
        audio = _audio(folder, dataset, f"{row['ID']}.LOFI")
        found.append(Example(audio, split_of_track[row["ID"]], key_index(row["MANUAL KEY"], source)))
    return found


def _track_splits(path: Path) -> dict[str, str]:
    """Track ID -> split: artists by name hash (100 train : 16 valid), collaborators of valid artists valid."""
    rows = read_table(path, ["ID", "ARTIST"], delimiter="\t", expected="the MTG key set's Beatport metadata")
    artists_of = {row["ID"]: [name.strip() for name in row["ARTIST"].split(",")] for row in rows}
    split = {
        artist: hash_split(artist.lower(), train=100, valid=16) for names in artists_of.values() for artist in names
    }
    for _ in range(2):  # two hops, as JukeMIR
        for names in artists_of.values():
            if any(split[artist] == "valid" for artist in names):
                split.update(dict.fromkeys(names, "valid"))
    return {
        track: "valid" if any(split[a] == "valid" for a in names) else "train" for track, names in artists_of.items()
    }


def _dataset(folder: Path, name: str) -> Path:
    """The clone of a GiantSteps dataset: NAME itself, or NAME-<commit> as JukeMIR and MARBLE unpack it."""
    candidates = sorted(
        path for path in folder.glob(f"{name}*") if path.is_dir() and path.name[len(name) :][:1] in ("", "-")
    )
    if not candidates:
        raise DatasetError(f"{folder}: no {name} folder; clone github.com/GiantSteps/{name} there")
    return candidates[0]


def _audio(folder: Path, dataset: Path, stem: str) -> Path:
    beside = dataset / "audio" / f"{stem}.mp3"
    shared = folder / "audio" / f"{stem}.mp3"
    return shared if not beside.is_file() and shared.is_file() else beside
