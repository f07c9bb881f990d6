"""`music2vec launch` without SLURM: the checks before submission, the dry run, a local job that requeues itself."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.attempts import latest_job
from cluster.config import ClusterConfig, load_job_config, slurm_minutes
from data.jsonlines import read
from trainer.cli import main
from trainer.config import load_config, save_config
from trainer.layout import complete_checkpoints, tag
from trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "20"]


def launch_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["launch", TINY, f"data.shards={shards}", f"train.run_dir={run_dir}", *CPU_JOB, *extra]


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30", 2), ("2:00:00", 120), ("3-00:00:00", 4320), ("1-2", 1560), ("1-2:30", 1590), ("0:30", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert slurm_minutes(text) == minutes


def test_cluster_section_in_the_yaml_and_flags_win(tmp_path, demo_shards, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text(
        Path(TINY).read_text() + "cluster:\n  nodes: 3\n  gpus_per_node: 4\n  partition: gpu\n  time: '1-00:00:00'\n"
    )
    experiment, cluster = load_job_config(config, ["cluster.qos=high"])
    assert cluster == ClusterConfig(nodes=3, gpus_per_node=4, partition="gpu", time="1-00:00:00", qos="high")
    assert experiment.model.dim == 64  # the rest of the YAML is the experiment, unchanged

    run_dir = tmp_path / "run"
    overrides = [f"data.shards={demo_shards}", f"train.run_dir={run_dir}", "cluster.qos=high"]
    main(["launch", str(config), *overrides, "--nodes=1", "--dry-run"])
    report = capsys.readouterr().out
    assert "world: 1 node(s) x 4 GPUs = 4 ranks" in report
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --qos=high", "#SBATCH --time=1440"):
        assert line in report
    assert "#SBATCH --signal=USR2@120" in report
    assert "#SBATCH --requeue" in report
    assert "dry run: nothing submitted" in report
    assert not run_dir.exists()  # a dry run leaves nothing behind


def test_dry_run_prints_the_batch_arithmetic(tmp_path, demo_shards, capsys):
    main([*launch_args(demo_shards, tmp_path / "run", "train.grad_accum=3"), "--dry-run"])
    report = capsys.readouterr().out
    # tiny.yaml: 4 crops of 2 s per micro-batch; 2 ranks; 1 CPU per task leaves 1 loader worker
    assert "world: 1 node(s) x 2 CPU tasks = 2 ranks; 1 loader workers per rank" in report
    assert "x 3 micro-batches = 12 crops = 0.4 min of audio per update" in report
    assert "global: 24 crops = 0.8 min of audio (0.77 M samples) per update" in report
    assert "#SBATCH --ntasks-per-node=2" in report
    assert "#SBATCH --cpus-per-task=1" in report
    assert "workers: 1" in report  # data.workers=-1 (auto) is resolved in the printed config


def test_loader_workers_are_sized_from_the_task_cpus(tmp_path, demo_shards, capsys):
    main([*launch_args(demo_shards, tmp_path / "run", "data.workers=-1", "data.resample=true"), "--dry-run"])
    assert "1 loader workers per rank" in capsys.readouterr().out
    args = launch_args(demo_shards, tmp_path / "run", "data.workers=-1", "data.resample=true")
    main([*args, "--cpus-per-task", "6", "--dry-run"])
    assert "5 loader workers per rank (cluster.cpus_per_task=6)" in capsys.readouterr().out
    main([*args, "--cpus-per-task", "64", "--dry-run"])
    assert "8 loader workers per rank" in capsys.readouterr().out  # capped: more only cost memory


REFUSALS = {  # case: (overrides, what the error must say); {tmp} is the test's folder
    "missing manifest": (["data.shards={tmp}/nowhere/manifest.json"], "nowhere/manifest.json"),
    "missing shards": (["data.shards={tmp}/gone-{{0..3}}.tar"], "4 of 4 shards"),
    "too few shards": (["data.workers=4"], "6 shard(s) for 2 rank(s) x 4 worker(s)"),
    "deepspeed batch": (  # 4 crops x 2 micro-batches x 2 ranks
        ["train.ds_config={tmp}/hand_made.json"],
        "train_batch_size=8 contradicts the experiment config, which gives 16",
    ),
    "another run's folder": (["train.run_dir={tmp}/used"], "holds another config"),
    "run dir under a file": (["train.run_dir={tmp}/file/run"], "is not a writable folder"),
    "fp16 on CPUs": (["train.precision=fp16"], "fp16 needs GPUs"),
    "unknown cluster key": (["cluster.gpu=2"], "Key 'gpu' not in 'ClusterConfig'"),
    "bad time": (["cluster.time=soon"], "cluster.time='soon' is not a SLURM time"),
    "local on 2 nodes": (["cluster.nodes=2", "cluster.executor=local"], "runs on one node"),
    "no SLURM here": (["cluster.executor=slurm"], "sbatch is not on PATH"),  # run with PATH=/nonexistent
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_launches_are_refused_before_anything_is_submitted(case, tmp_path, demo_shards, capsys, monkeypatch):
    if case == "no SLURM here":
        monkeypatch.setenv("PATH", "/nonexistent")  # a machine without SLURM's commands
    (tmp_path / "file").write_text("")
    template = json.loads((ROOT / "ds_configs" / "zero2.json").read_text()) | {"train_batch_size": 8}
    (tmp_path / "hand_made.json").write_text(json.dumps(template))
    used = load_config(TINY, [f"data.shards={demo_shards}", f"train.run_dir={tmp_path}/used", "optim.lr=0.5"])
    (tmp_path / "used").mkdir()
    save_config(used, tmp_path / "used" / "config.yaml")

    overrides, message = REFUSALS[case]
    run_dir = tmp_path / "run"
    args = launch_args(demo_shards, run_dir, "train.grad_accum=2", *(item.format(tmp=tmp_path) for item in overrides))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in error, error
    assert not list(tmp_path.rglob("jobs")), "nothing may be submitted"
    assert not list(tmp_path.rglob("attempts.jsonl"))


@pytest.mark.slow
def test_local_job_requeues_on_the_timeout_signal_and_finishes(tmp_path, demo_shards):
    """Two ranks as local processes; USR2 twice (the second while the first is being handled) -> one checkpoint,
    one requeue, and the next attempt finishes: every update logged exactly once."""
    updates, run_dir = 30, tmp_path / "run"
    args = launch_args(demo_shards, run_dir, f"optim.max_updates={updates}", "train.checkpoint_every=100")
    launcher = subprocess.Popen([MUSIC2VEC, *args, "--executor", "local"], stdout=subprocess.PIPE, text=True)
    _signal_tasks_after(run_dir, launcher, updates=5, times=2)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert f"updates {_first_end(run_dir)} -> {updates}" in output

    steps = [entry["step"] for entry in read_metrics(run_dir)]
    assert steps == list(range(1, updates + 1))
    job = latest_job(run_dir)
    assert [attempt.restart for attempt in job.attempts] == [0, 1]
    assert job.attempts[0].reason == "requeue (SIGUSR2)"
    assert job.attempts[1].start_step == job.attempts[0].end_step
    assert job.attempts[1].reason == "done"
    assert [step for step, _ in complete_checkpoints(run_dir)] == [job.attempts[0].end_step, updates]


@pytest.mark.slow
def test_a_job_out_of_requeues_checkpoints_and_stops(tmp_path, demo_shards):
    """submitit counts a signal as a time-out once the job is within 10 min of its limit (else as a preemption,
    which is always requeued); with a 10 min limit every signal is a time-out."""
    run_dir = tmp_path / "run"
    args = launch_args(demo_shards, run_dir, "optim.max_updates=100", "train.checkpoint_every=100")
    launcher = subprocess.Popen(
        [MUSIC2VEC, *args, "--executor=local", "--max-requeues=0", "--time=10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _signal_tasks_after(run_dir, launcher, updates=3, times=1)
    _, errors = launcher.communicate(timeout=300)
    assert launcher.returncode == 1
    assert "timed-out too many times" in errors
    [attempt] = latest_job(run_dir).attempts
    assert [step for step, _ in complete_checkpoints(run_dir)] == [attempt.end_step]  # nothing lost


@pytest.mark.slow
def test_a_warning_after_the_last_stop_check_does_not_requeue_a_finished_run(tmp_path, demo_shards):
    """USR2 to every task, again and again, from the moment the final checkpoint is being written (after the last
    update's stop check) until the job ends: the run is done, and no second attempt is queued."""
    updates, run_dir = 6, tmp_path / "run"
    args = launch_args(demo_shards, run_dir, f"optim.max_updates={updates}", "train.checkpoint_every=100")
    launcher = subprocess.Popen([MUSIC2VEC, *args, "--executor", "local"], stdout=subprocess.PIPE, text=True)
    final = run_dir / "checkpoints" / tag(updates)
    deadline = time.monotonic() + 300
    while not final.exists():
        assert launcher.poll() is None, "the job ended before its final checkpoint"
        assert time.monotonic() < deadline, "the final checkpoint was never started"
        time.sleep(0.01)
    tasks = _tasks_of(int(_started(run_dir)[-1]["pid"]))
    while launcher.poll() is None:
        for pid in tasks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
        time.sleep(0.02)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert f"done on cpu: updates 0 -> {updates}" in output
    [attempt] = latest_job(run_dir).attempts
    assert (attempt.end_step, attempt.reason) == (updates, "done")


@pytest.mark.slow
def test_of_two_launches_at_the_same_moment_exactly_one_trains(tmp_path, demo_shards):
    """Both start together; whichever claims the run directory first submits, the other is refused naming it."""
    run_dir = tmp_path / "run"
    args = launch_args(demo_shards, run_dir, "optim.max_updates=4", "train.checkpoint_every=100")
    launches = [
        subprocess.Popen([MUSIC2VEC, *args, "--executor", "local"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    assert sorted(launch.returncode for launch in launches) == [0, 2], outputs
    refused = next(errors.decode() for launch, (_, errors) in zip(launches, outputs, strict=True) if launch.returncode)
    assert f"{run_dir} is in use by music2vec " in refused
    submitted = [event for event in read(run_dir / "attempts.jsonl") if event["event"] == "submitted"]
    assert len(submitted) == 1
    assert [entry["step"] for entry in read_metrics(run_dir)] == [1, 2, 3, 4]


def _signal_tasks_after(run_dir: Path, launcher: subprocess.Popen, *, updates: int, times: int) -> None:
    """USR2 (what SLURM sends before a time limit) to every task of the job once it has done `updates` updates."""
    deadline = time.monotonic() + 300
    while len(read_metrics(run_dir)) < updates:
        assert launcher.poll() is None, "the job ended before it trained"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    rank0 = int(_started(run_dir)[-1]["pid"])
    for _ in range(times):
        for pid in _tasks_of(rank0):
            os.kill(pid, signal.SIGUSR2)
        time.sleep(0.05)


def _started(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    return [event for event in events if event["event"] == "started"]


def _first_end(run_dir: Path) -> int:
    return latest_job(run_dir).attempts[0].end_step


def _tasks_of(rank0: int) -> list[int]:
    """The job's task processes: rank 0 and the other children of its parent (the local controller)."""
    parent = Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[1]
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.slow
def test_status_reads_a_run_directory(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            MUSIC2VEC,
            "train",
            TINY,
            f"data.shards={demo_shards}",
            f"train.run_dir={run_dir}",
            "optim.max_updates=6",
            "train.checkpoint_every=4",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = subprocess.run([MUSIC2VEC, "status", str(run_dir)], capture_output=True, text=True, check=True).stdout
    header, row = table.splitlines()
    assert header.split()[:4] == ["run", "job", "state", "step"]
    cells = row.split()
    assert cells[0] == str(run_dir)
    assert cells[1:4] == ["-", "-", "6/6"]  # trained without a job: no job, no scheduler state
    assert f"{read_metrics(run_dir)[-1]['loss']:.4f}" in cells
    assert "6 (" in row  # the newest COMPLETE checkpoint


def test_status_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run([MUSIC2VEC, "status", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert f"{tmp_path}: not a run directory" in result.stderr
