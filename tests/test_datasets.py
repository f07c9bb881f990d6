"""Dataset adapters on small trees in the published layouts (tests/published_layouts.py): splits, targets and
left-out items as the protocols define them, and a clear error naming the file for what is missing or malformed.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import published_layouts as layouts
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from data.audio import SAMPLE_RATE
from data.scores import KEYS
from model import Data2VecAudio, load_hf, save_hf
from model.config import preset
from probes.datasets import emomusic, giantsteps, gtzan, magnatagatune
from probes.datasets.files import DatasetError
from probes.features import extract, normalised_windows, task_features, windows
from probes.nightly import write_report
from probes.probe import REGISTRY
from probes.tasks import Example

MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict]:
    """One data root holding all four datasets, and what each builder says the adapter should find."""
    root = tmp_path_factory.mktemp("datasets")
    expected = {
        "mtt": layouts.magnatagatune(root),
        "gtzan": layouts.gtzan(root),
        "giantsteps_key": layouts.giantsteps(root),
        "emomusic": layouts.emomusic(root),
    }
    return root, expected


def by_split(examples) -> dict[str, list]:
    return {split: [e for e in examples if e.split == split] for split in ("train", "valid", "test")}


def test_magnatagatune_splits_by_folder_keeps_the_top_50_and_leaves_out_corrupt_clips(published):
    root, expected = published
    task = magnatagatune.TASKS["mtt"]
    found = by_split(magnatagatune.examples(task, root))
    for split, clips in expected["mtt"].items():
        assert {str(e.path.relative_to(root / "MTT" / "mp3")): e.target for e in found[split]} == {
            path: tuple(task.labels.index(tag) for tag in tags) for path, tags in clips.items()
        }
    assert [len(found[split]) for split in ("train", "valid", "test")] == [24, 2, 6]  # folders 0-b, c, d-f


def test_gtzan_follows_the_fault_filtered_lists(published):
    root, expected = published
    found = by_split(gtzan.examples(gtzan.TASKS["gtzan"], root))
    for split, entries in expected["gtzan"].items():
        assert [str(e.path.relative_to(root / "GTZAN" / "genres")) for e in found[split]] == entries
        assert [gtzan.GENRES[e.target] for e in found[split]] == [entry.split("/")[0] for entry in entries]


def test_giantsteps_filters_mtg_tracks_splits_by_artist_and_spells_keys_with_flats(published):
    root, expected = published
    found = by_split(giantsteps.examples(giantsteps.TASKS["giantsteps_key"], root))
    flat = {"C# minor": "Db minor", "F# major": "Gb major"}
    for split, tracks in expected["giantsteps_key"].items():
        assert {e.path.name.split(".")[0]: KEYS[e.target] for e in found[split]} == {
            track: flat.get(key, key) for track, key in tracks.items()
        }
    assert found["test"][0].path.parent == root / "GS" / "audio"  # MARBLE's shared audio folder
    assert found["train"][0].path.parent == root / "GS" / "giantsteps-mtg-key-dataset" / "audio"  # the clone's


def test_emomusic_tests_on_the_mediaeval_evaluation_set_and_splits_the_rest_by_artist(published):
    root, expected = published
    found = by_split(emomusic.examples(emomusic.TASKS["emomusic"], root))
    for split, songs in expected["emomusic"].items():
        assert {e.path.stem: e.target for e in found[split]} == songs


def test_giantsteps_keeps_whole_30_s_windows_only(published):
    root, _ = published
    task = giantsteps.TASKS["giantsteps_key"]
    test_track = by_split(giantsteps.examples(task, root))["test"][0]
    torch.manual_seed(0)
    encoder = Data2VecAudio(preset("tiny"))
    whole = extract(encoder, [str(test_track.path)], min_window_seconds=task.min_window_seconds, progress=False)
    marble = extract(encoder, [str(test_track.path)], progress=False)
    assert (len(whole.example), len(marble.example)) == (2, 3)  # 61 s: the 1 s tail only counts at MARBLE's 1 s


@pytest.mark.parametrize(("seconds", "count"), [(120.0, 4), (119.99, 4), (119.9, 3), (89.0, 2)])
def test_a_track_has_as_many_whole_windows_as_jukemir_counts_clips(seconds, count):
    """A 120.0 s track has four 30 s clips, even when decoding leaves it a few milliseconds short."""
    audio = np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)
    assert len(windows(audio, min_window_seconds=30.0)) == count


def test_giantsteps_normalises_each_window_on_its_own():
    """JukeMIR and MARBLE normalise each 30 s clip; a quiet intro must not stay quiet beside a loud drop."""
    rng = np.random.default_rng(0)
    quiet, loud = 0.1 * rng.standard_normal(30 * SAMPLE_RATE), rng.standard_normal(30 * SAMPLE_RATE)
    audio = np.concatenate([quiet, loud]).astype(np.float32) + 0.5
    assert giantsteps.TASKS["giantsteps_key"].normalise == "window"
    by_window = normalised_windows(audio, 30.0, "window")
    by_file = normalised_windows(audio, 30.0, "file")
    assert [round(float(w.std()), 2) for w in by_window] == [1.0, 1.0]
    assert [round(float(w.mean()), 3) for w in by_window] == [0.0, 0.0]
    assert by_file[0].std() < 0.2  # the file's statistics: the intro stays quiet, the drop loud
    assert by_file[1].std() > 1.3


def copy_tree(published, tmp_path) -> Path:
    subprocess.run(["cp", "-r", str(published[0]), str(tmp_path / "root")], check=True)
    return tmp_path / "root"


@pytest.mark.parametrize(
    ("task", "breakage", "message"),
    [
        ("mtt", lambda r: (r / "MTT" / "annotations_final.csv").unlink(), r"MTT/annotations_final\.csv: missing"),
        ("mtt", lambda r: _edit(r / "MTT" / "annotations_final.csv", '"0"\t"', '"2"\t"', 1),
         r"annotations_final\.csv, line 2: tag .* is '2'; expected 0 or 1"),
        ("mtt", lambda r: _edit(r / "MTT" / "annotations_final.csv", '"mp3_path"', '"path"'),
         r"no column\(s\) \['mp3_path'\]"),
        ("mtt", lambda r: _edit(r / "MTT" / "annotations_final.csv", '"guitar"', '"guitars"'),
         r"not MagnaTagATune's published top 50 \(missing \['guitar'\]\)"),
        ("mtt", lambda r: (r / "MTT" / "mp3" / "c").rename(r / "MTT" / "c"), r"MTT: 2 of 32 audio files are missing"),
        ("gtzan", lambda r: (r / "GTZAN" / "valid_filtered.txt").unlink(), r"valid_filtered\.txt: missing"),
        ("gtzan", lambda r: _edit(r / "GTZAN" / "test_filtered.txt", "rock/", "polka/"),
         r"test_filtered\.txt, line 10: 'polka/rock\.00003\.wav' is not <genre>/<file>"),
        ("giantsteps_key", lambda r: _edit(next((r / "GS").glob("giantsteps-key-*/annotations/key/3000.LOFI.key")),
                                           "Eb minor", "Eb dorian"), r"3000\.LOFI\.key: key 'Eb dorian' is not"),
        ("giantsteps_key", lambda r: _edit(r / "GS" / "giantsteps-mtg-key-dataset" / "annotations" /
                                           "beatport_metadata.txt", "106\t", "999\t"),
         r"annotations\.txt, ID 106: no row with this ID in beatport_metadata\.txt"),
        ("giantsteps_key", lambda r: (r / "GS" / "giantsteps-mtg-key-dataset").rename(r / "mtg"),
         r"GS: no giantsteps-mtg-key-dataset folder"),
        ("emomusic", lambda r: _edit(r / "EMO" / "static_annotations.csv", " 1.0,", " high,"),
         r"static_annotations\.csv, song_id 2: mean_arousal and mean_valence must be numbers"),
        ("emomusic", lambda r: _edit(r / "EMO" / "songs_info.csv", "Mediaeval 2013 set", "set"),
         r"songs_info\.csv: no column\(s\) \['Mediaeval 2013 set'\]"),
        ("emomusic", lambda r: _append(r / "EMO" / "songs_info.csv", b"99,99.mp3,Beyonc\xe9,Song,0.0,"),
         r"songs_info\.csv, line 15: not UTF-8 text \(byte 0xe9\); convert the file to UTF-8"),
        ("gtzan", lambda r: _append(r / "GTZAN" / "test_filtered.txt", b"pop/caf\xe9.wav\n"),
         r"test_filtered\.txt, line 11: not UTF-8 text \(byte 0xe9\)"),
        ("gtzan", lambda r: (r / "GTZAN" / "genres" / "rock" / "rock.00003.wav").write_bytes(b""),
         r"rock\.00003\.wav: empty file"),
        ("gtzan", lambda r: (r / "GTZAN" / "genres" / "rock" / "rock.00003.wav").write_bytes(b"<html>404</html>"),
         r"rock\.00003\.wav: cannot be decoded \(.*\); download it again"),
    ],
)  # fmt: skip
def test_a_missing_or_malformed_file_is_named_with_what_was_expected(published, tmp_path, task, breakage, message):
    root = copy_tree(published, tmp_path)
    breakage(root)
    _, adapter = REGISTRY[task]
    with pytest.raises(DatasetError, match=message):
        adapter(REGISTRY[task][0], root)


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def _edit(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text, f"the fixture has no {old!r} in {path}"
    path.write_text(text.replace(old, new, count))


@pytest.mark.slow
def test_probe_runs_every_published_task_and_the_report_shows_the_published_scores(published, tmp_path):
    """The real tasks end to end on their layouts: decoding MP3, WAV and stereo, heads, metrics, report."""
    root, _ = published
    torch.manual_seed(0)
    export = save_hf(Data2VecAudio(preset("tiny")), tmp_path / "run" / "exports" / "step_000000010")
    tasks = ["mtt", "gtzan", "giantsteps_key", "emomusic"]
    out = tmp_path / "rows.jsonl"
    command = [MUSIC2VEC, "probe", str(export), "--tasks", *tasks, "--data-root", str(root)]
    command += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(row["task"], row["metric"]) for row in rows} == {
        ("mtt", "roc_auc"), ("mtt", "average_precision"), ("gtzan", "accuracy"),
        ("giantsteps_key", "accuracy"), ("giantsteps_key", "weighted_score"),
        ("emomusic", "r2"), ("emomusic", "r2_arousal"), ("emomusic", "r2_valence"),
    }  # fmt: skip
    chosen = {row["head"]["ensemble"] for row in rows if row["task"] == "giantsteps_key"}
    assert chosen <= {"vote", "max_logit", "mean", "mean_softmax"}  # picked on validation, recorded with the head
    assert {row["head"]["ensemble"] for row in rows if row["task"] != "giantsteps_key"} == {"mean"}
    (tmp_path / "run" / "probes").mkdir()
    (tmp_path / "run" / "probes" / "results.jsonl").write_text(out.read_text())
    report = write_report(tmp_path / "run").read_text()
    assert "| step | metric | score | seeds | Music2Vec (published) | Jukebox (published) |" in report
    assert re.search(r"^\| 10 \| weighted_score \| .* \| 0\.501 \| 0\.667 \|$", report, re.MULTILINE)
    assert (tmp_path / "run" / "probes" / "report.png").stat().st_size > 0


def test_a_bad_audio_file_is_named_and_the_files_before_it_are_not_extracted_again(tmp_path):
    """The third of five files holds NaN: extraction stops naming it and keeps the features of the first two. Once
    the file is fixed, the next extraction takes those two from what was kept (the first file, garbled since with
    its size and time kept, is never decoded again) and gives what a clean extraction gives."""
    torch.manual_seed(0)
    export = save_hf(Data2VecAudio(preset("tiny")), tmp_path / "export")
    files = [layouts.write_audio(tmp_path / "audio" / f"{n}.wav", 2.0, 16_000, seed=n) for n in range(5)]
    bad, first = files[2], files[0]
    clean = bad.read_bytes()
    audio, rate = sf.read(bad, dtype="float32")
    audio[100] = np.nan
    sf.write(bad, audio, rate, subtype="FLOAT")
    task = REGISTRY["demo_key"][0]
    examples = [Example(path, "train", 0) for path in files]
    cache = tmp_path / "cache"

    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))}: holds samples that are not finite"):
        task_features(export, task, examples, cache=cache, progress=False)
    [kept] = cache.glob("*/demo_key.progress")
    assert sorted(set(load_file(kept)["example"].tolist())) == [0, 1]

    bad.write_bytes(clean)
    expected = extract(load_hf(export), [str(path) for path in files], progress=False)
    times = first.stat()
    first.write_bytes(b"\0" * times.st_size)  # unreadable if it were decoded again
    os.utime(first, ns=(times.st_atime_ns, times.st_mtime_ns))
    features = task_features(export, task, examples, cache=cache, progress=False)
    assert torch.equal(features.example, expected.example)
    torch.testing.assert_close(features.values, expected.values)
    assert not kept.exists()


@pytest.mark.slow
def test_features_that_are_not_finite_are_refused_before_anything_is_cached(tmp_path, probe_data):
    """A checkpoint whose weights hold NaN (a diverged run): no features, no cache entry, no result rows."""
    model = Data2VecAudio(preset("tiny"))
    with torch.no_grad():
        model.feature_projection.proj.weight.fill_(float("nan"))
    export = save_hf(model, tmp_path / "run" / "exports" / "step_000000010")
    out = tmp_path / "rows.jsonl"
    command = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_key", "--data-root", str(probe_data)]
    command += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert f"{export}: its encoder's features of" in done.stderr
    assert "are not finite" in done.stderr
    assert not out.exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
