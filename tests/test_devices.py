"""Which device a rank trains on, shown on this machine: when GPUs count as asked for, which GPU a rank takes, a
refusal that names the driver this torch needs, and the compilers that opt-in features need, checked up front."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.environment import GPUUnavailableError, cuda_device_index, gpus_requested
from trainer.cli import main
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="shows what happens where torch has no GPU")


@pytest.mark.parametrize(
    ("job_gpus", "environ", "driver", "asked"),
    [
        (8, {}, False, "the job asked for 8 GPU(s) per node"),
        (0, {"CUDA_VISIBLE_DEVICES": "0"}, True, None),  # a CPU job says so, whatever the node has
        (None, {"CUDA_VISIBLE_DEVICES": "0,1"}, False, None),  # the deepspeed launcher sets it on CPUs too
        (None, {"CUDA_VISIBLE_DEVICES": ""}, True, None),  # the way to train on the CPU on purpose
        (None, {"CUDA_VISIBLE_DEVICES": "-1"}, True, None),
        (None, {"SLURM_GPUS_ON_NODE": "4"}, False, "SLURM allocated 4 GPU(s) on this node"),
        (None, {"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": ""}, False, None),
        (None, {}, True, "this node has an NVIDIA driver"),
        (None, {"LOCAL_WORLD_SIZE": "2"}, False, None),  # several ranks on a CPU machine are a CPU run
    ],
)
def test_when_gpus_count_as_asked_for(tmp_path, job_gpus, environ, driver, asked):
    control = tmp_path / "nvidiactl"
    if driver:
        control.touch()
    reason = gpus_requested(job_gpus=job_gpus, environ=environ, control_device=control)
    assert reason == asked if asked is None else reason.startswith(asked)


@pytest.mark.parametrize(
    ("local_rank", "local_world_size", "visible", "index"),
    [
        (0, 8, 8, 0),
        (5, 8, 8, 5),  # every task sees the node's GPUs: its local rank picks one
        (5, 8, 1, 0),  # one GPU bound to each task (--gpus-per-task, cgroups): the only one it sees
        (0, 1, 1, 0),
        (1, 2, 4, 1),
    ],
)
def test_a_rank_takes_a_gpu_it_can_see(local_rank, local_world_size, visible, index):
    assert cuda_device_index(local_rank, local_world_size, visible) == index


def test_a_layout_with_too_few_gpus_for_the_ranks_is_refused():
    with pytest.raises(GPUUnavailableError, match="local rank 3 of 4 sees 2 GPUs"):
        cuda_device_index(3, 4, 2)


@needs_no_gpu
@pytest.mark.slow
def test_gpus_asked_for_but_unusable_stop_training_before_it_starts(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [MUSIC2VEC, "train", TINY, f"data.shards={demo_shards}", f"train.run_dir={run_dir}"]
    gpu_job = os.environ | {"SLURM_GPUS_ON_NODE": "1"}  # what SLURM exports in a job step given a GPU
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=gpu_job)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "GPUs were asked for (SLURM allocated 1 GPU(s) on this node) but torch cannot use any" in result.stderr
    if torch.version.cuda:
        assert f"built for CUDA {torch.version.cuda}, which needs an NVIDIA driver >=" in result.stderr
    assert "set CUDA_VISIBLE_DEVICES= (empty)" in result.stderr
    assert not run_dir.exists()


@needs_no_gpu
@pytest.mark.slow
def test_a_launched_gpu_job_on_a_node_without_usable_gpus_fails_with_the_reason(demo_shards, tmp_path, capsys):
    args = ["launch", TINY, f"data.shards={demo_shards}", f"train.run_dir={tmp_path / 'run'}", "--executor", "local"]
    assert main([*args, "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "10"]) == 1
    assert "GPUs were asked for (the job asked for 1 GPU(s) per node)" in capsys.readouterr().err


COMPILING_OPTIONS = {
    "train.offload=true": "DeepSpeed compiles its CPU Adam from C++",
    "train.compile=true": "train.compile=true needs a C++ compiler (CXX",
}


@pytest.mark.parametrize("option", COMPILING_OPTIONS)
@needs_no_gpu
def test_features_that_compile_at_start_are_refused_up_front_without_a_compiler(
    demo_shards, tmp_path, monkeypatch, capsys, option
):
    message = COMPILING_OPTIONS[option]
    monkeypatch.setenv("CXX", "/no/such/c++")
    experiment = [TINY, f"data.shards={demo_shards}", f"train.run_dir={tmp_path / 'run'}", option]
    for command in (["train", *experiment], ["launch", *experiment, "--gpus-per-node", "0", "--dry-run"]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compile_is_refused_with_zero3():
    with pytest.raises(ValueError, match=r"train\.compile needs train\.zero_stage 1 or 2"):
        load_config(TINY, ["train.compile=true", "train.zero_stage=3"])
