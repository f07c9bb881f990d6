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


def test_demo_trains_the_tiny_model_and_says_what_it_is(music2vec):
    result = subprocess.run([music2vec, "demo", "--steps", "3"], capture_output=True, text=True, check=True)
    assert "smoke run" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert all(math.isfinite(float(row[1])) for row in rows)


def test_unknown_command_fails_with_usage(music2vec):
    result = subprocess.run([music2vec, "frobnicate"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
