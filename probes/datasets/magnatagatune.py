"""MagnaTagATune, top-50 tags (docs/ALGORITHM.md §10.1): JukeMIR's and MARBLE's split by MP3 folder.

Layout under DATA_ROOT (MARBLE's `data/MTT`):

    MTT/annotations_final.csv   tab-separated, quoted: clip_id, 188 tags (0/1), mp3_path ("f/artist-...-30-59.mp3")
    MTT/mp3/0 ... MTT/mp3/f     the unzipped mp3.zip.001-003

Folders 0-b are train, c is valid, d-f test. The top 50 tags are counted over every annotated clip; a clip
without any of them stays in (JukeMIR). Three clips whose MP3s are corrupt are left out, as JukeMIR does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from probes.datasets.files import DatasetError, read_table, require_audio
from probes.tasks import Example, Task

FOLDER = "MTT"
ANNOTATIONS = "annotations_final.csv"
CORRUPT_CLIPS = frozenset({"35644", "55753", "57881"})
SPLIT_OF_FOLDER = {**dict.fromkeys("0123456789ab", "train"), "c": "valid", **dict.fromkeys("def", "test")}
# The 50 most frequent tags of annotations_final.csv, most frequent first (as musicnn and JukeMIR find them).
TOP_50 = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
    "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing",
    "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop",
    "soft", "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice",
    "female vocal", "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
)  # fmt: skip

TASKS = {
    "mtt": Task(
        "mtt",
        "multilabel",
        TOP_50,
        monitor="roc_auc",
        lr=1e-3,
        plateau_patience=3,
        stop_patience=10,
        references={
            "Music2Vec": {"roc_auc": 0.895, "average_precision": 0.359},
            "Jukebox": {"roc_auc": 0.915, "average_precision": 0.414},
        },
    )
}


def examples(task: Task, data_root: Path) -> list[Example]:
    folder = Path(data_root) / FOLDER
    path = folder / ANNOTATIONS
    rows = read_table(
        path, ["clip_id", "mp3_path"], delimiter="\t", expected="MagnaTagATune's tab-separated tag annotations"
    )
    tags = [column for column in rows[0] if column not in ("clip_id", "mp3_path")]
    _check_top_50(path, rows, tags)
    found = []
    for line, row in enumerate(rows, start=2):
        if row["clip_id"] in CORRUPT_CLIPS:
            continue
        split = SPLIT_OF_FOLDER.get(row["mp3_path"].split("/")[0])
        if split is None:
            raise DatasetError(f"{path}, line {line}: mp3_path {row['mp3_path']!r} is not under a folder 0-f")
        target = tuple(index for index, tag in enumerate(task.labels) if row[tag] == "1")
        found.append(Example(folder / "mp3" / row["mp3_path"], split, target))
    return require_audio(found, folder)


def _check_top_50(path: Path, rows: list[dict[str, str]], tags: list[str]) -> None:
    counts: Counter[str] = Counter()
    for line, row in enumerate(rows, start=2):
        bad = [tag for tag in tags if row[tag] not in ("0", "1")]
        if bad:
            raise DatasetError(f"{path}, line {line}: tag {bad[0]!r} is {row[bad[0]]!r}; expected 0 or 1")
        counts.update(tag for tag in tags if row[tag] == "1")
    # the most frequent first; ties keep the file's column order, as JukeMIR's stable sort does
    top = sorted(tags, key=lambda tag: -counts[tag])[:50]
    if set(top) != set(TOP_50):
        raise DatasetError(
            f"{path}: its 50 most frequent tags are not MagnaTagATune's published top 50 (missing"
            f" {sorted(set(TOP_50) - set(top))[:5]}); use the dataset's own annotations_final.csv"
        )
