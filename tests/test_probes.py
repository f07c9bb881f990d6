"""Probes: song-level metrics, 30 s windows, the feature cache, and `music2vec probe` on a real export."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.audio import SAMPLE_RATE
from model import Data2VecAudio, save_hf
from model.config import preset
from probes.datasets import demo
from probes.features import Features, extract, model_folder, task_features, windows
from probes.head import HeadConfig, train_probe
from probes.metrics import key_weighted_score, score
from probes.tasks import Example, Task

MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
KEY = demo.TASKS["demo_key"]


@pytest.mark.parametrize(
    ("truth", "guess", "expected"),
    [("C major", "C major", 1.0), ("C major", "G major", 0.5), ("C major", "A minor", 0.3),
     ("C major", "C minor", 0.2), ("C major", "Gb major", 0.0)],
)  # fmt: skip
def test_key_score_gives_partial_credit_like_mir_eval(truth, guess, expected):
    labels = KEY.labels
    score_ = key_weighted_score(KEY, np.array([labels.index(guess)]), np.array([labels.index(truth)]))
    assert score_ == pytest.approx(expected)


def test_multilabel_scores_leave_out_tags_no_song_has():
    task = Task("tags", "multilabel", ("a", "b", "never"), monitor="roc_auc")
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    perfect = targets * 2.0 - 1.0
    scores = score(task, perfect, targets)
    assert scores == {"roc_auc": 1.0, "average_precision": 1.0}


def test_regression_reports_r2_per_target():
    task = Task("emotion", "regression", ("arousal", "valence"), monitor="r2")
    targets = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 1.0]])
    outputs = targets.copy()
    outputs[:, 1] = targets[:, 1].mean()  # valence predicted as its mean: R² 0
    scores = score(task, outputs, targets)
    assert scores["r2_arousal"] == pytest.approx(1.0)
    assert scores["r2_valence"] == pytest.approx(0.0)
    assert scores["r2"] == pytest.approx(0.5)


def test_windows_are_30_s_and_a_last_one_under_1_s_is_dropped():
    assert [len(w) / SAMPLE_RATE for w in windows(np.zeros(65 * SAMPLE_RATE, np.float32))] == [30, 30, 5]
    assert [len(w) / SAMPLE_RATE for w in windows(np.zeros(int(60.5 * SAMPLE_RATE), np.float32))] == [30, 30]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_hf(Data2VecAudio(preset("tiny")), tmp_path_factory.mktemp("export") / "step_000000007")


def test_features_are_cached_per_checkpoint_and_task(export, probe_data, tmp_path):
    examples = demo.examples(KEY, probe_data)[:6]
    first = task_features(export, KEY, examples, cache=tmp_path, progress=False)
    assert first.values.shape == (6, 5, 64)  # one 15 s window per clip; the tiny model's 4 layers + its input
    moved = [type(e)(tmp_path / "gone.flac", e.split, e.target) for e in examples]
    with pytest.raises(RuntimeError, match=r"gone\.flac"):  # other files: extracted, not taken from the cache
        task_features(export, KEY, moved, cache=tmp_path, progress=False)
    tempo = demo.TASKS["demo_tempo"]
    again = task_features(export, tempo, examples, cache=tmp_path, progress=False)  # same audio: reused
    assert torch.equal(again.values, first.values)
    direct = extract(model_folder_encoder(export), [str(examples[0].path)], progress=False)
    torch.testing.assert_close(direct.values[0], first.values[0])


def model_folder_encoder(export: Path) -> Data2VecAudio:
    from model import load_hf

    return load_hf(model_folder(export))


def test_a_run_checkpoint_resolves_to_its_export(tmp_path, export):
    run = tmp_path / "run"
    (run / "checkpoints" / export.name).mkdir(parents=True)
    (run / "exports").mkdir()
    (run / "exports" / export.name).symlink_to(export)
    assert model_folder(run / "checkpoints" / export.name) == run / "exports" / export.name
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        model_folder(tmp_path)


def test_probe_command_writes_rows_for_each_seed_and_metric(export, probe_data, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_instruments", "--data-root", str(probe_data),
           "--seeds", "0", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
           "--standardize"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(row["seed"], row["metric"]) for row in rows} == {
        (seed, metric) for seed in (0, 1) for metric in ("roc_auc", "average_precision")
    }
    assert all(row["step"] == 7 and row["task"] == "demo_instruments" for row in rows)
    assert all(row["head"]["standardize"] for row in rows)
    assert all(0.0 <= row["value"] <= 1.0 for row in rows)
    assert "demo_instruments     roc_auc" in result.stdout
    assert "(n=2)" in result.stdout


def test_unknown_task_is_refused(export, tmp_path):
    cmd = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_mood", "--data-root", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "unknown probe task(s) ['demo_mood']" in result.stderr


def test_standardized_features_expose_a_small_signal_under_large_noise():
    """JukeMIR's standardisation: the class lives in a dimension a million times smaller than the noise beside it."""
    generator = torch.Generator().manual_seed(0)
    count = 192
    labels = (torch.arange(count) // 4) % 2  # both classes in every split
    values = torch.randn(count, 3, 4, generator=generator) * 1000
    values[:, :, 0] = (labels[:, None] * 2 - 1) * 1e-3
    splits = ["train", "train", "valid", "test"]
    examples = [Example(Path(f"clip{i}.flac"), splits[i % 4], int(labels[i])) for i in range(count)]
    task = Task("toy", "multiclass", ("a", "b"), monitor="accuracy", stop_patience=100)
    features = Features(values, torch.arange(count))
    plain = train_probe(task, examples, features, seed=0, cfg=HeadConfig())
    scaled = train_probe(task, examples, features, seed=0, cfg=HeadConfig(standardize=True))
    assert scaled.test["accuracy"] == 1.0
    assert plain.test["accuracy"] < 0.8
