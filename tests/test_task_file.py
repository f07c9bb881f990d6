"""Probe tasks from a file: the shipped example (tests/probe_task) read, probed with `music2vec probe` on a
real export, and every kind of mistake in such a file named with its file and line before any feature exists."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Data2VecAudio, save_hf
from model.config import preset
from probes.datasets.files import DatasetError
from probes.datasets.task_file import load_task_file
from probes.probe import known_tasks

MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")


def test_the_example_task_file_reads_as_a_task_with_its_examples(task_dir):
    task, adapter = load_task_file(task_dir / "register.yaml")
    assert (task.name, task.kind, task.labels, task.monitor) == ("register", "multiclass", ("low", "high"), "accuracy")
    assert task.lr == 0.001
    assert task.stop_patience == 10
    examples = adapter(task, Path("/nowhere"))  # the data root plays no part
    assert [sum(e.split == split for e in examples) for split in ("train", "valid", "test")] == [12, 4, 4]
    assert examples[1].path == task_dir / "clips" / "train_01_high.wav"
    assert examples[1].target == 1
    assert examples[0].song == examples[2].song == "train_low_0"


def test_jsonl_examples_with_multilabel_and_regression_targets(task_dir):
    lines = [
        {"audio": f"clips/{split}_0{i}_{('low', 'high')[i % 2]}.wav", "split": split}
        for split in ("train", "valid", "test")
        for i in range(2)
    ]
    table = task_dir / "tags.jsonl"
    tagged = [line | {"labels": ["bright"] if i % 2 else []} for i, line in enumerate(lines)]
    table.write_text("".join(json.dumps(line) + "\n" for line in tagged))
    (task_dir / "tags.yaml").write_text(
        "kind: multilabel\nlabels: [bright, dark]\nmetric: roc_auc\nexamples: tags.jsonl\n"
    )
    task, adapter = load_task_file(task_dir / "tags.yaml")
    assert task.name == "tags"
    assert [e.target for e in adapter(task, task_dir)][:2] == [(), (0,)]
    (task_dir / "pitch.csv").write_text(
        "audio,split,low_hz,high_hz\n"
        + "".join(f"clips/{s}_00_low.wav,{s},110,220\n" for s in ("train", "valid", "test"))
    )
    (task_dir / "pitch.yaml").write_text(
        "kind: regression\nlabels: [low_hz, high_hz]\nmetric: r2\nexamples: pitch.csv\n"
    )
    task, adapter = load_task_file(task_dir / "pitch.yaml")
    assert adapter(task, task_dir)[0].target == (110.0, 220.0)
    table.write_text(table.read_text().replace('"split": "valid"', '"split": valid', 1))
    with pytest.raises(DatasetError, match=r"tags\.jsonl, line 3: not JSON"):
        load_task_file(task_dir / "tags.yaml")


MISTAKES = {  # what is done to the example: (file, old text, new text), and what the message must say
    "unknown kind": (
        "register.yaml", "kind: multiclass", "kind: classification",
        r"register\.yaml: kind: 'classification' is not one of \['multiclass', 'multilabel', 'regression'\]",
    ),
    "metric of another kind": (
        "register.yaml", "metric: accuracy", "metric: r2",
        r"register\.yaml: metric: 'r2' does not fit kind multiclass; use one of \['accuracy', 'weighted_score'\]",
    ),
    "weighted score without keys": (
        "register.yaml", "metric: accuracy", "metric: weighted_score", r"register\.yaml: labels: 'low' is not a key",
    ),
    "unknown key": (
        "register.yaml", "metric: accuracy", "metric: accuracy\nmetrics: [r2]",
        r"register\.yaml: unknown key\(s\) \['metrics'\]",
    ),
    "bad head setting": (
        "register.yaml", "stop_patience: 10", "stop_patience: -1",
        r"register\.yaml: head\.stop_patience: expected a positive number, got -1",
    ),
    "label not in the list": (
        "register.csv", "train_02_low.wav,train,low", "train_02_low.wav,train,lowest",
        r"register\.csv, line 4: label 'lowest' is not one of the task's labels \(low, high\)",
    ),
    "missing audio": (
        "register.csv", "clips/valid_01_high.wav", "clips/valid_01_gone.wav",
        r"register\.csv, line 15: audio 'clips/valid_01_gone\.wav': no such file",
    ),
    "unknown split": (
        "register.csv", "clips/test_00_low.wav,test", "clips/test_00_low.wav,testing",
        r"register\.csv, line 18: split 'testing' is not one of",
    ),
    "a split with no examples": (
        "register.csv", ",valid,", ",train,",
        r"register\.csv: no valid examples; every split \(train, valid, test\) needs some",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("file", "old", "new", "message"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_mistake_is_named_with_its_file_and_line(task_dir, file, old, new, message):
    path = task_dir / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(DatasetError, match=message):
        load_task_file(task_dir / "register.yaml")


def test_unreadable_audio_is_named_with_its_line(task_dir):
    (task_dir / "clips" / "test_03_high.wav").write_bytes(b"RIFF but not audio")
    with pytest.raises(DatasetError, match=r"register\.csv, line 21: .*test_03_high\.wav: cannot be decoded"):
        load_task_file(task_dir / "register.yaml")


def test_a_task_file_may_not_take_a_built_in_name(task_dir):
    yaml = task_dir / "register.yaml"
    yaml.write_text(yaml.read_text().replace("name: register", "name: gtzan"))
    with pytest.raises(DatasetError, match=r"register\.yaml: name 'gtzan' is already a task"):
        known_tasks((yaml,))


@pytest.mark.slow
def test_probe_runs_a_task_file_like_a_built_in_task(task_dir, tmp_path):
    torch.manual_seed(0)
    export = save_hf(Data2VecAudio(preset("tiny")), tmp_path / "export" / "step_000000005")
    out = tmp_path / "results.jsonl"
    cmd = [MUSIC2VEC, "probe", str(export), "--task-file", str(task_dir / "register.yaml"), "--seeds", "0", "1",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(row["task"], row["metric"], row["seed"], row["step"]) for row in rows} == {
        ("register", "accuracy", seed, 5) for seed in (0, 1)
    }
    assert all(row["primary"] for row in rows)
    assert "register" in result.stdout
    assert list((tmp_path / "cache").rglob("*.safetensors")), "features are cached as for a built-in task"

    (task_dir / "register.csv").write_text((task_dir / "register.csv").read_text().replace(",high,", ",loud,", 1))
    elsewhere = [*cmd[:-2], "--cache-dir", str(tmp_path / "none")]
    refused = subprocess.run(elsewhere, capture_output=True, text=True, check=False, timeout=600)
    assert refused.returncode == 2
    assert "register.csv, line 3: label 'loud' is not one of the task's labels (low, high)" in refused.stderr
    assert not (tmp_path / "none").exists()  # refused before any feature was extracted
