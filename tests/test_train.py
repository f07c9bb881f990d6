"""The trainer as users run it: `music2vec train` processes, killed, signalled and resumed; its files read back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Data2VecAudioModel

from model import Music2Vec, ema_decay, load_hf
from trainer.config import load_config
from trainer.layout import complete_checkpoints
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # each test runs `music2vec train` in one or more processes

ROOT = Path(__file__).resolve().parents[1]
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
UPDATES = 24


def command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        MUSIC2VEC,
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"optim.max_updates={UPDATES}",
        "train.checkpoint_every=8",
        "train.log_every=4",
        "train.keep_last=5",
        *extra,
    ]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600, **kwargs)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(demo_shards, tmp_path_factory) -> Path:
    """A run of UPDATES updates, never interrupted: the reference."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = run(command(demo_shards, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_run_writes_checkpoints_exports_metrics_and_tensorboard(straight):
    assert [step for step, _ in complete_checkpoints(straight)] == [8, 16, 24]
    assert (straight / "config.yaml").is_file()
    assert json.loads((straight / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == list(range(1, UPDATES + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    events = EventAccumulator(str(straight / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [4, 8, 12, 16, 20, 24]
    tags = set(events.Tags()["scalars"])
    for name in ("lr", "ema_decay", "grad_norm", "target_var", "pred_var", "masked_fraction", "audio_seconds_per_s"):
        assert f"train/{name}" in tags
    assert {"train/samples_per_s", "train/step_time", "train/data_wait_fraction", "system/max_rss_gb"} <= tags
    assert "train/loader_skipped_corrupt_audio" in tags
    export = Data2VecAudioModel.from_pretrained(straight / "exports" / "step_000000024")
    assert export.config.hidden_size == 64


def test_killed_run_resumes_exactly(demo_shards, straight, tmp_path):
    """kill -9 after the step-8 checkpoint, run the same command again: same losses, same weights. With
    train.deterministic, as a GPU run needs for this; on a CPU it changes nothing (`straight` runs without it)."""
    cmd = command(demo_shards, tmp_path, "train.deterministic=true")
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(tmp_path / "checkpoints" / "step_000000008" / "COMPLETE", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert [m["loss"] for m in read_metrics(tmp_path)] == [m["loss"] for m in read_metrics(straight)]
    for name in ("exports/step_000000024/model.safetensors", "checkpoints/step_000000024/teacher.safetensors"):
        ours, reference = load_file(tmp_path / name), load_file(straight / name)
        assert ours.keys() == reference.keys()
        for key, tensor in reference.items():
            assert torch.equal(ours[key], tensor), f"{name}: {key}"


def test_a_stop_signal_checkpoints_at_the_next_update_and_exits_cleanly(demo_shards, tmp_path):
    process = subprocess.Popen(
        command(demo_shards, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    wait_for(tmp_path / "metrics.jsonl", process)
    process.send_signal(signal.SIGUSR1)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    assert "stopped by SIGUSR1" in stdout
    step, folder = complete_checkpoints(tmp_path)[-1]
    assert step == read_metrics(tmp_path)[-1]["step"] < UPDATES  # saved where it stopped, not on the schedule
    assert json.loads((folder / "COMPLETE").read_text())["step"] == step


def test_a_run_directory_is_not_resumed_with_another_config(demo_shards, straight):
    result = run(command(demo_shards, straight, "optim.lr=0.01"))
    assert result.returncode == 2
    assert "holds another config" in result.stderr
    assert "--allow-config-change" in result.stderr


def test_a_bad_config_fails_before_training(demo_shards, tmp_path):
    result = run(command(demo_shards, tmp_path, "optim.warmup=3"))
    assert result.returncode == 2
    assert "Key 'warmup' not in 'OptimConfig'" in result.stderr
    assert not (tmp_path / "config.yaml").exists()


def torchrun(ranks: int, cmd: list[str]) -> list[str]:
    port = str(29_000 + os.getpid() % 1000)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}", *cmd]


def test_two_ranks_with_zero2_train_checkpoint_and_resume(demo_shards, tmp_path):
    cmd = torchrun(2, command(demo_shards, tmp_path, "optim.max_updates=12", "train.checkpoint_every=4"))
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for(tmp_path / "checkpoints" / "step_000000004" / "COMPLETE", process)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    process.communicate(timeout=300)
    stopped_at, folder = complete_checkpoints(tmp_path)[-1]
    assert stopped_at < 12
    assert sorted(p.name for p in folder.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    assert [step for step, _ in complete_checkpoints(tmp_path)][-1] == 12
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))


def test_the_deepspeed_launcher_runs_the_same_training_as_torchrun(demo_shards, tmp_path):
    port = str(29_500 + os.getpid() % 1000)
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus=2", f"--master_port={port}"]
    losses = {}
    threads = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun's default; summation order depends on the count
    for launcher, prefix in (("torchrun", torchrun(2, [])), ("deepspeed", deepspeed)):
        result = run([*prefix, *command(demo_shards, tmp_path / launcher, "optim.max_updates=6")], env=threads)
        assert result.returncode == 0, result.stderr[-3000:]
        marker = json.loads((tmp_path / launcher / "checkpoints" / "step_000000006" / "COMPLETE").read_text())
        assert marker["world_size"] == 2
        losses[launcher] = [entry["loss"] for entry in read_metrics(tmp_path / launcher)]
    assert losses["deepspeed"] == losses["torchrun"]


def test_zero3_teacher_follows_the_partitioned_student(two_rank_runs):
    """The EMA under ZeRO-3 (weights partitioned over two ranks) matches the same run under ZeRO-2 (weights whole).
    test_train_loop.py compares the two on one rank."""
    teachers = {
        stage: load_file(run_dir / "checkpoints" / "step_000000008" / "teacher.safetensors")
        for stage, run_dir in two_rank_runs.items()
    }
    assert_same_teacher_that_moved(teachers[2], teachers[3])


def assert_same_teacher_that_moved(zero2: dict[str, torch.Tensor], zero3: dict[str, torch.Tensor]) -> None:
    """The teachers of a ZeRO-2 and a ZeRO-3 run agree, and moved away from the model's start."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(cfg.train.seed)  # the trainer's seed before it builds the model
    initial = Music2Vec(cfg.model).teacher.state_dict()
    for name, tensor in zero2.items():
        torch.testing.assert_close(zero3[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    moved = [name for name, tensor in zero3.items() if not torch.equal(tensor, initial[name])]
    assert len(moved) > len(initial) // 2  # the teacher followed the student, not just kept its start


def test_divergence_aborts_with_the_last_checkpoint_intact(demo_shards, tmp_path):
    result = run(command(demo_shards, tmp_path, "optim.lr=1e6", "train.max_nonfinite=3", "train.checkpoint_every=1"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite losses in a row" in result.stderr
    assert "last complete checkpoint is intact" in result.stderr
    checkpoints = complete_checkpoints(tmp_path)
    assert checkpoints, "the update before the divergence was checkpointed"
    _, folder = checkpoints[-1]
    export = load_hf(tmp_path / "exports" / folder.name)
    assert all(torch.isfinite(p).all() for p in export.parameters())
    assert all(torch.isfinite(t).all() for t in load_file(folder / "teacher.safetensors").values())


def test_collapsed_targets_abort_the_run(demo_shards, tmp_path):
    result = run(command(demo_shards, tmp_path, "train.min_target_var=100", "train.collapse_check_after=2"))
    assert result.returncode == 1
    assert "target_var=" in result.stderr
    assert "at update 3" in result.stderr


def test_bf16_trains_against_an_fp32_teacher_and_fp16_is_refused_without_a_gpu(demo_shards, tmp_path):
    result = run(command(demo_shards, tmp_path / "bf16", "train.precision=bf16", "optim.max_updates=8"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(m["loss"] == m["loss"] for m in read_metrics(tmp_path / "bf16"))  # no NaN
    teacher = load_file(tmp_path / "bf16" / "checkpoints" / "step_000000008" / "teacher.safetensors")
    assert {tensor.dtype for tensor in teacher.values()} == {torch.float32}
    if not torch.cuda.is_available():
        refused = run(command(demo_shards, tmp_path / "fp16", "train.precision=fp16"))
        assert refused.returncode == 2
        assert "fp16 needs a GPU" in refused.stderr


def test_with_gradient_accumulation_the_teacher_moves_once_per_update(demo_shards, tmp_path):
    """teacher(n) = lerp(teacher(n-1), student(n), 1 - decay(n)), checked on every saved update of an accum-2 run."""
    extra = ("train.grad_accum=2", "optim.max_updates=4", "train.checkpoint_every=1", "train.keep_last=10")
    result = run(command(demo_shards, tmp_path, *extra))
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = load_config(tmp_path / "config.yaml")
    state = torch.load(tmp_path / "checkpoints" / "step_000000004" / "rank_00000.pt", weights_only=True)
    assert state["loader"]["streams"][0]["batches"] == 8  # two micro-batches per update
    for step in range(2, 5):
        previous = load_file(tmp_path / "checkpoints" / f"step_{step - 1:09d}" / "teacher.safetensors")
        teacher = load_file(tmp_path / "checkpoints" / f"step_{step:09d}" / "teacher.safetensors")
        student = load_hf(tmp_path / "exports" / f"step_{step:09d}").transformer.state_dict()
        decay = ema_decay(step, start=cfg.model.ema_decay, end=cfg.model.ema_end_decay, anneal_steps=30_000)
        for name, tensor in teacher.items():
            expected = (
                student[name] if name.startswith("pos_conv.") else torch.lerp(previous[name], student[name], 1 - decay)
            )
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7, msg=f"update {step}: {name}")


def test_compiled_training_takes_the_same_steps_with_layerdrop(demo_shards, tmp_path):
    """train.compile (ZeRO-2 from tiny.yaml) with LayerDrop dropping half the layers: the losses of the uncompiled
    run, to float rounding. Dropout is off in both, so that both draw the same layers: compiled dropout draws its
    random numbers differently (with dropout on, losses differ by a few percent from the first update)."""
    losses = {}
    for compiled in ("false", "true"):
        extra = ["optim.max_updates=6", "model.layerdrop=0.5", "model.dropout=0", "model.attention_dropout=0"]
        result = run(command(demo_shards, tmp_path / compiled, *extra, f"train.compile={compiled}"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "recompile_limit" not in result.stderr  # compiled for real, not fallen back to eager
        losses[compiled] = [m["loss"] for m in read_metrics(tmp_path / compiled)]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["true"][-1] < losses["true"][0]
