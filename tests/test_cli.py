"""The installed `music2vec` console script."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXECUTABLE = shutil.which("music2vec", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def music2vec():
    if EXECUTABLE is None:
        pytest.fail("the music2vec console script is not installed beside this Python; run `make test`")
    return EXECUTABLE


def test_help_lists_the_commands(music2vec):
    result = subprocess.run([music2vec, "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_readme_documents_every_command_and_no_other():
    import argparse
    import re

    from cluster.cli import build_parser

    parser = build_parser()
    [commands] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"^\| `music2vec (\w+)", readme, flags=re.MULTILINE))
    assert documented == set(commands.choices)


def test_demo_makes_music_shards_and_a_trained_run(music2vec, tmp_path):
    out = tmp_path / "demo"
    cmd = [music2vec, "demo", "--out", str(out), "--clips", "6", "--steps", "20"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    assert (out / "shards" / "manifest.json").is_file()
    assert (out / "run" / "checkpoints" / "step_000000020" / "COMPLETE").is_file()
    assert (out / "run" / "exports" / "step_000000020" / "model.safetensors").is_file()
    loss_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("loss"))
    first, last = (float(word) for word in loss_line.split() if word.replace(".", "").isdigit() and "." in word)
    assert math.isfinite(first)
    assert math.isfinite(last)
    assert f"tensorboard --logdir {out / 'run' / 'tb'}" in result.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)  # reuses everything
    assert "writing" not in again.stdout
    assert loss_line in again.stdout


def test_unknown_command_fails_with_usage(music2vec):
    result = subprocess.run([music2vec, "frobnicate"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
