"""`make gpu-check` rehearsed on this machine: its offline install into a venv over this Python, one training check,
and the GPU-only checks listed as skipped, with the report files a device call brings back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this is the real suite: make gpu-check")
def test_the_gpu_check_rehearses_its_install_and_a_training_run_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--venv", str(tmp_path / "venv")]
    only = "optimizer_without_compiler,train,flash_attention"
    cmd += ["--wheels", str(tmp_path / "no_wheels"), "--only", only, "--quick"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "rehearsal on the CPU (no GPU)"
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == ["install", "environment", "data", "optimizer_without_compiler", "train", "flash_attention"]
    assert checks["install"]["status"] == "passed"
    assert (tmp_path / "venv" / "bin" / "music2vec").is_file()  # the project, installed offline in the check venv
    no_compiler = checks["optimizer_without_compiler"]
    assert (no_compiler["status"], no_compiler["details"]["built"]) == ("passed", [])  # DeepSpeed built nothing
    assert checks["train"]["status"] == "passed", checks["train"]["summary"]
    losses = checks["train"]["details"]["runs"]["zero2/fp32"]["losses"]
    assert losses[-1] < losses[0]
    assert (checks["flash_attention"]["status"], checks["flash_attention"]["summary"]) == ("skipped", "needs a GPU")
    assert "| train | passed |" in (out / "gpu_check.md").read_text()
    assert "===== train" in (out / "gpu_check.log").read_text()
