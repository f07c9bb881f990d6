"""Probes: song-level metrics, 30 s windows, the feature cache, and `music2vec probe` on a real export."""

import json
import re
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tone

from data.audio import SAMPLE_RATE
from model import Data2VecAudio, save_hf
from model.config import preset
from probes.datasets import demo, emomusic, giantsteps
from probes.datasets.files import DatasetError
from probes.features import Features, extract, model_folder, task_features, windows
from probes.head import (
    JUKEMIR_EVALUATE_EVERY,
    JUKEMIR_PATIENCE,
    SONG_ENSEMBLES,
    HeadConfig,
    LayerWeightedMLP,
    best_on_valid,
    fit_jukemir,
    jukemir_grid,
    lr_sweep,
    probe_inputs,
    song_outputs,
    train_probe,
)
from probes.metrics import key_weighted_score, score
from probes.tasks import Example, Task
from trainer.cli import main

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


@pytest.mark.slow  # the demo tasks' clips (probe_data) take a while to make
def test_features_are_cached_per_checkpoint_and_task(export, probe_data, tmp_path):
    examples = demo.examples(KEY, probe_data)[:6]
    first = task_features(export, KEY, examples, cache=tmp_path, progress=False)
    assert first.values.shape == (6, 5, 64)  # one 15 s window per clip; the tiny model's 4 layers + its input
    moved = [type(e)(tmp_path / "gone.flac", e.split, e.target) for e in examples]
    with pytest.raises(DatasetError, match=r"gone\.flac: missing"):  # other files: extracted, not from the cache
        task_features(export, KEY, moved, cache=tmp_path, progress=False)
    tempo = demo.TASKS["demo_tempo"]
    again = task_features(export, tempo, examples, cache=tmp_path, progress=False)  # same audio: reused
    assert torch.equal(again.values, first.values)
    direct = extract(model_folder_encoder(export), [str(examples[0].path)], progress=False)
    torch.testing.assert_close(direct.values[0], first.values[0])
    bf16 = task_features(export, KEY, examples, cache=tmp_path, precision="bf16", progress=False)
    assert not torch.equal(bf16.values, first.values)  # a precision of its own, not the fp32 entry
    assert sorted(path.name for path in tmp_path.rglob("*.safetensors")) == [
        "demo_key.bf16.safetensors",
        "demo_key.safetensors",
    ]


def test_windows_batched_across_files_give_the_features_of_each_alone(export, tmp_path):
    # windows of 30+30+5, 30+5, 5, 6, 7 and 8 s: with batches of 2, five windows end up waiting for company, more
    # than twice a batch, so the longest-waiting one goes alone
    lengths = {"long.flac": 65.0, "middle.flac": 35.0, "short.flac": 5.0, "six.flac": 6.0, "seven.flac": 7.0}
    lengths["eight.flac"] = 8.0
    paths = [tmp_path / name for name in lengths]
    for seed, (path, seconds) in enumerate(zip(paths, lengths.values(), strict=True)):
        sf.write(path, tone(seconds, SAMPLE_RATE, seed=seed), SAMPLE_RATE)
    encoder = model_folder_encoder(export).train()
    batched = extract(encoder, [str(p) for p in paths], windows_per_batch=2, progress=False)
    alone = extract(encoder, [str(p) for p in paths], windows_per_batch=1, progress=False)
    assert batched.values.shape == (9, 5, 64)
    assert batched.example.tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 5]  # in file order, whatever batch it went in
    torch.testing.assert_close(batched.values, alone.values, atol=1e-5, rtol=1e-4)
    assert encoder.training  # the caller's encoder is left as it was

    bf16 = extract(encoder, [str(p) for p in paths], precision="bf16", progress=False)
    error = (bf16.values - batched.values).norm(dim=-1) / batched.values.norm(dim=-1)
    assert 0 < error.max() < 0.05  # bf16 autocast really ran, and stayed close (PROBES.md has the measurement)


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


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    """Shared by the command tests: the demo tasks' clips are extracted once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_probe_command_writes_rows_for_each_seed_and_metric(export, probe_data, feature_cache, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_instruments", "--data-root", str(probe_data),
           "--seeds", "0", "1", "--cache-dir", str(feature_cache), "--out", str(out),
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
    assert "demo_instruments     weighted roc_auc" in result.stdout
    assert "(n=2)" in result.stdout


@pytest.mark.slow
def test_a_layer_wise_curve_has_a_linear_probe_per_hidden_state(export, probe_data, feature_cache, tmp_path):
    out = tmp_path / "curve.jsonl"
    cmd = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_tempo", "--data-root", str(probe_data),
           "--cache-dir", str(feature_cache), "--out", str(out), "--layers", "all", "--linear"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["head"]["layer"] for row in rows] == [0, 1, 2, 3, 4]  # the tiny model's input and its 4 layers
    assert {row["head"]["hidden"] for row in rows} == {0}
    assert len(set(result.stdout.splitlines())) == 6  # a header and a line per layer


@pytest.mark.slow
def test_a_layer_the_model_lacks_is_refused_before_any_extraction(export, probe_data, tmp_path):
    cmd = [MUSIC2VEC, "probe", str(export), "--tasks", "demo_key", "--data-root", str(probe_data),
           "--cache-dir", str(tmp_path), "--layers", "0", "9"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 2
    assert "layers [9]:" in result.stderr
    assert "hidden states 0..4" in result.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.slow
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


def separable(count: int, signal_layer: int) -> tuple[list[Example], Features]:
    """Two classes whose only trace is one dimension of one hidden state, in 3 hidden states of noise."""
    generator = torch.Generator().manual_seed(1)
    labels = (torch.arange(count) // 4) % 2
    values = torch.randn(count, 3, 8, generator=generator)
    values[:, signal_layer, 0] += (labels * 2 - 1) * 4.0
    splits = ["train", "train", "valid", "test"]
    return [Example(Path(f"c{i}.flac"), splits[i % 4], int(labels[i])) for i in range(count)], Features(
        values, torch.arange(count)
    )


def test_a_fixed_layer_head_sees_that_hidden_state_alone():
    task = Task("toy", "multiclass", ("a", "b"), monitor="accuracy", lr=1e-2)
    examples, features = separable(128, signal_layer=0)
    layer_0 = train_probe(task, examples, features, seed=0, cfg=HeadConfig(hidden=0, layer=0))
    layer_2 = train_probe(task, examples, features, seed=0, cfg=HeadConfig(hidden=0, layer=2))
    weighted = train_probe(task, examples, features, seed=0, cfg=HeadConfig())  # 1..L: the input is left out
    assert layer_0.test["accuracy"] == 1.0
    assert layer_2.test["accuracy"] < 0.8
    assert weighted.test["accuracy"] < 0.8


def test_the_searches_and_the_choice_on_validation():
    assert [head.lr for head in lr_sweep(HeadConfig(hidden=0))] == [1e-2, 5e-3, 1e-3, 5e-4, 1e-4]
    grid = jukemir_grid(HeadConfig(layer=3))
    assert len({astuple(head) for head in grid}) == 216
    assert all(head.input_dropout == head.dropout and head.layer == 3 for head in grid)
    assert {head.hidden for head in grid} == {0, 512}
    assert {head.weight_decay for head in grid} == {0.0, 1e-4, 1e-3}
    task = Task("toy", "multiclass", ("a", "b"), monitor="accuracy")
    examples, features = separable(128, signal_layer=1)
    frozen, learning = HeadConfig(lr=1e-9, max_epochs=3), HeadConfig(lr=1e-2)
    chosen, result = best_on_valid(task, examples, features, seed=0, heads=[frozen, learning])
    assert chosen == learning
    assert result.valid["accuracy"] == 1.0


def test_song_ensembles_combine_windows_as_jukemir_does():
    windows = torch.tensor([[10.0, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 1], [0, 3, 0]])
    song = torch.tensor([0, 0, 0, 1, 1])
    predicted = {name: song_outputs(windows, song, 2, name).argmax(dim=1).tolist() for name in SONG_ENSEMBLES}
    assert predicted == {
        "mean": [0, 1],
        "max_logit": [0, 1],
        "vote": [1, 1],  # song 1's tie between classes 1 and 2 goes to the lower one
        "mean_softmax": [1, 1],  # one confident window outweighs two others in logits, not in probabilities
    }


def test_jukemir_loop_stops_after_256_evaluations_without_a_better_score_and_keeps_the_best_head():
    task = Task("toy", "multiclass", ("a", "b"), monitor="accuracy")
    examples, features = separable(64, signal_layer=1)
    cfg = HeadConfig(hidden=0, layer=1, lr=1e-2)
    inputs = probe_inputs(task, examples, features, cfg)
    head = LayerWeightedMLP(1, 8, 2, cfg)
    scores = iter([0.1, 0.5, 0.7, 0.6])  # three better scores, then a worse one, then the same forever
    seen: list[dict[str, torch.Tensor]] = []

    def validate() -> float:
        seen.append({name: value.clone() for name, value in head.state_dict().items()})
        return next(scores, 0.7)

    steps = fit_jukemir(head, task, inputs, cfg, seed=0, validate=validate)
    assert steps == (3 + JUKEMIR_PATIENCE) * JUKEMIR_EVALUATE_EVERY
    assert len(seen) == 3 + JUKEMIR_PATIENCE
    best = seen[2]  # the third evaluation's weights: the first 0.7
    assert all(torch.equal(head.state_dict()[name], value) for name, value in best.items())
    assert not torch.equal(seen[-1]["mlp.1.weight"], best["mlp.1.weight"])  # training went on after it


def test_jukemir_protocol_takes_one_feature_vector_per_clip(export, tmp_path):
    """Emomusic's 45 s clips: MARBLE's 30 s + 15 s windows, one vector under JukeMIR's protocol; GiantSteps' clips
    are its 30 s windows under both."""
    path = tmp_path / "clip.wav"
    sf.write(path, tone(45.0, SAMPLE_RATE, seed=3), SAMPLE_RATE)
    examples = [Example(path, "train", (0.5, 0.5))]
    emo = emomusic.TASKS["emomusic"]
    marble = task_features(export, emo, examples, cache=tmp_path / "cache", progress=False)
    jukemir = task_features(export, emo, examples, cache=tmp_path / "cache", progress=False, protocol="jukemir")
    assert (len(marble.example), len(jukemir.example)) == (2, 1)
    assert not torch.allclose(jukemir.values[0], marble.values.mean(dim=0))  # the whole clip at once, not a mean
    key = giantsteps.TASKS["giantsteps_key"]
    clips = task_features(export, key, [Example(path, "test", 0)], cache=tmp_path / "cache", protocol="jukemir")
    assert len(clips.example) == 1  # one whole 30 s window; the 15 s tail is dropped


@pytest.mark.parametrize(
    ("options", "message"),
    [([], r"--protocol jukemir probes one hidden state at a time"),
     (["--layers", "2", "--search", "lr"], r"leave out --search lr")],
)  # fmt: skip
def test_jukemir_protocol_needs_a_named_layer_and_no_other_search(export, tmp_path, options, message, capsys):
    with pytest.raises(SystemExit) as exited:  # the command's own entry point, in this process
        main(["probe", str(export), "--tasks", "demo_key", "--data-root", str(tmp_path / "none"),
              "--cache-dir", str(tmp_path), "--protocol", "jukemir", *options])  # fmt: skip
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "none").exists()  # nothing prepared, nothing extracted
