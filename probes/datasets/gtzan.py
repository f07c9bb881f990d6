"""GTZAN genre, fault-filtered split (Kereliuk et al. 2015, Sturm; docs/ALGORITHM.md §10.1): 443 / 197 / 290 tracks.

Layout under DATA_ROOT (MARBLE's `data/GTZAN`):

    GTZAN/genres/<genre>/<genre>.000NN.wav       the 1000 tracks (the original .au files are read as well)
    GTZAN/{train,valid,test}_filtered.txt        one "blues/blues.00029.wav" per line (coreyker/dnn-mgr)
"""

from __future__ import annotations

from pathlib import Path

from probes.datasets.files import DatasetError, read_text, require_audio
from probes.tasks import Example, Task

FOLDER = "GTZAN"
GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")

TASKS = {
    "gtzan": Task(
        "gtzan",
        "multiclass",
        GENRES,
        monitor="accuracy",
        lr=5e-3,
        plateau_patience=6,
        stop_patience=20,
        references={"Music2Vec": {"accuracy": 0.766}, "Jukebox": {"accuracy": 0.797}},
    )
}


def examples(_task: Task, data_root: Path) -> list[Example]:  # one task: nothing to choose
    folder = Path(data_root) / FOLDER
    found = []
    for split in ("train", "valid", "test"):
        listing = folder / f"{split}_filtered.txt"
        text = read_text(listing, "the fault-filtered split list, one genre/file.wav per line")
        for line, entry in enumerate(text.split(), start=1):
            genre, _, name = entry.partition("/")
            if genre not in GENRES or not name:
                raise DatasetError(
                    f"{listing}, line {line}: {entry!r} is not <genre>/<file> with one of the genres {GENRES}"
                )
            found.append(Example(_audio(folder / "genres" / genre, name), split, GENRES.index(genre)))
    return require_audio(found, folder)


def _audio(genre_folder: Path, name: str) -> Path:
    """The listed file, or the same track as the original distribution's .au."""
    listed = genre_folder / name
    original = listed.with_suffix(".au")
    return original if not listed.is_file() and original.is_file() else listed
