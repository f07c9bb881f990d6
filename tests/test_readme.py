"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the example shards, loads and exports

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # the example writes export/ into the working directory
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - the project's own README
    assert (tmp_path / "export" / "model.safetensors").is_file()
