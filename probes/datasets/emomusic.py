"""Emomusic (JukeMIR, docs/ALGORITHM.md §10.1): static arousal and valence of 744 clips of 45 s, scored with R².

Layout under DATA_ROOT (MARBLE's `data/EMO`: the unpacked annotations and clips of "1000 songs for emotional
analysis of music"):

    EMO/songs_info.csv            song_id, file_name, Artist, Song title, ..., Mediaeval 2013 set
    EMO/static_annotations.csv    song_id, mean_arousal, std_arousal, mean_valence, std_valence
    EMO/clips_45seconds/<song_id>.mp3

The MediaEval 2013 "evaluation" set is the test split; the rest is split 8:2 into train and valid by a hash of
the artist's name (lower case, letters and spaces only), as in JukeMIR. The head standardises the targets with
the training split's statistics, which leaves R² as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

from probes.datasets.files import DatasetError, hash_split, read_table, require_audio
from probes.tasks import Example, Task

FOLDER = "EMO"

TASKS = {
    "emomusic": Task(
        "emomusic",
        "regression",
        ("arousal", "valence"),
        monitor="r2",
        lr=1e-3,
        plateau_patience=5,
        stop_patience=20,
        references={
            "Music2Vec": {"r2_arousal": 0.694, "r2_valence": 0.574},
            "Jukebox": {"r2_arousal": 0.721, "r2_valence": 0.617},
        },
    )
}


def examples(_task: Task, data_root: Path) -> list[Example]:  # one task: nothing to choose
    folder = Path(data_root) / FOLDER
    songs = read_table(
        folder / "songs_info.csv",
        ["song_id", "Artist", "Mediaeval 2013 set"],
        delimiter=",",
        expected="Emomusic's song list",
    )
    annotations_path = folder / "static_annotations.csv"
    annotations = {
        row["song_id"]: row
        for row in read_table(
            annotations_path,
            ["song_id", "mean_arousal", "mean_valence"],
            delimiter=",",
            expected="Emomusic's static (per-clip) annotations",
        )
    }
    found = []
    for song in songs:
        if not song["song_id"].isdigit():
            raise DatasetError(f"{folder / 'songs_info.csv'}: song_id {song['song_id']!r} is not a number")
        row = annotations.get(song["song_id"])
        if row is None:
            raise DatasetError(f"{annotations_path}: no row for song_id {song['song_id']} of songs_info.csv")
        split = "test" if song["Mediaeval 2013 set"] == "evaluation" else _dev_split(song["Artist"])
        audio = folder / "clips_45seconds" / f"{int(song['song_id'])}.mp3"
        found.append(Example(audio, split, _targets(row, f"{annotations_path}, song_id {song['song_id']}")))
    return require_audio(found, folder)


def _dev_split(artist: str) -> str:
    letters = "".join(c for c in artist.lower() if c.isascii() and (c.isalpha() or c.isspace()))
    return hash_split(re.sub(r"\s+", " ", letters).strip(), train=8, valid=2)


def _targets(row: dict[str, str], source: str) -> tuple[float, float]:
    try:
        return float(row["mean_arousal"]), float(row["mean_valence"])
    except ValueError as error:
        raise DatasetError(f"{source}: mean_arousal and mean_valence must be numbers ({error})") from None
