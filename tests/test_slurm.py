"""`music2vec launch`, `nightly` and `shard --array` on a real SLURM: the project's one-node cluster
(cluster/testing/local_slurm.sh), tasks on CPU.

Starts system services: munge, mariadb, slurmdbd, slurmctld and slurmd, on 127.0.0.1 only, installing their Debian
packages when missing (needs root and apt), unless they are running already; writes /etc/slurm/slurm.conf and
slurmdbd.conf. What the `slurm` fixture started, it stops when the session ends.

The reference run is never interrupted; every other run must log exactly its per-update losses, so no update was
lost or repeated across cancels and kills. The time-limit requeue is tested on two hosts (test_two_hosts.py), and
with local processes (test_launch.py).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from conftest import TEST_PARAMS, tone
from test_shard_array import tree
from test_shards import blocked_run

from cluster.attempts import latest_job
from data.shard_parts import merge_parts
from data.shards import Part, write_shards
from probes.nightly import read_results
from trainer.layout import complete_checkpoints
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
UPDATES = 20


def launch_command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        MUSIC2VEC,
        "launch",
        str(ROOT / "configs" / "tiny.yaml"),
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"optim.max_updates={UPDATES}",
        "train.checkpoint_every=5",
        "train.keep_last=10",
        "--executor=slurm",
        "--gpus-per-node=0",
        "--tasks-per-node=2",
        "--cpus-per-task=1",
        "--time=15",
        *extra,
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)


def slurm_states(job_id: str) -> list[str]:
    """Every record sacct keeps of the job, requeues included, oldest first."""
    command = ["sacct", "--duplicates", "--allocations", "--noheader", "--parsable2", "-o", "State", "-j", job_id]
    listed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines()]


def in_queue(job_id: str) -> bool:
    """Still pending, running or completing (its processes not all gone)."""
    listed = subprocess.run(["squeue", "--noheader", "--jobs", job_id], capture_output=True, text=True, check=False)
    return bool(listed.stdout.strip())


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def status_row(run_dir: Path) -> list[str]:
    return run([MUSIC2VEC, "status", str(run_dir)]).stdout.splitlines()[1].split()


def losses(run_dir: Path) -> dict[int, float]:
    entries = read_metrics(run_dir)
    steps = [entry["step"] for entry in entries]
    assert steps == list(range(1, len(steps) + 1)), f"updates lost or repeated: {steps}"
    return {entry["step"]: entry["loss"] for entry in entries}


@pytest.fixture(scope="module")
def reference(slurm, demo_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    result = run(launch_command(demo_shards, run_dir, f"--partition={slurm}", "--wait"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return run_dir


def test_two_task_job_trains_and_checkpoints(reference):
    job = latest_job(reference)
    wait_until(lambda: slurm_states(job.job_id) != ["RUNNING"], "the batch script to end")  # results come first
    assert slurm_states(job.job_id) == ["COMPLETED"]
    assert len(losses(reference)) == UPDATES
    assert [step for step, _ in complete_checkpoints(reference)] == [5, 10, 15, 20]
    assert (reference / "exports" / "step_000000020" / "model.safetensors").is_file()
    events = [json.loads(line)["event"] for line in (reference / "attempts.jsonl").read_text().splitlines()]
    assert events == ["submitted", "started", "ended"]
    [attempt] = job.attempts
    assert (attempt.restart, attempt.start_step, attempt.end_step, attempt.reason) == (0, 0, UPDATES, "done")
    assert attempt.details["world_size"] == 2
    log = (reference / "jobs" / job.job_id / f"{job.job_id}_0_log.out").read_text()
    assert f"update {UPDATES}/{UPDATES}: loss" in log  # plain progress lines in the job's log, not a progress bar
    assert status_row(reference)[1:4] == [job.job_id, "done", f"{UPDATES}/{UPDATES}"]


def test_cancel_and_a_killed_node_leave_a_run_that_resumes(reference, demo_shards, tmp_path):
    """scancel (SIGTERM, then SIGKILL after KillWait) and a node lost without any signal (SIGKILL to every process
    of the job, in the middle of writing a checkpoint); launching again resumes from the last COMPLETE checkpoint."""
    run_dir = tmp_path / "run"
    command = launch_command(demo_shards, run_dir)

    assert run(command).returncode == 0
    wait_until(lambda: len(read_metrics(run_dir)) >= 3, "training to pass update 3")
    cancelled = latest_job(run_dir).job_id
    subprocess.run(["scancel", cancelled], check=True)
    wait_until(lambda: not in_queue(cancelled), "the cancelled job's processes to end")  # KillWait lets them save
    assert slurm_states(cancelled) == ["CANCELLED"]
    [attempt] = latest_job(run_dir).attempts
    assert attempt.reason == "stopped (SIGTERM)"
    assert complete_checkpoints(run_dir)[-1][0] == attempt.end_step  # it checkpointed before it stopped
    assert status_row(run_dir)[1:3] == [cancelled, "cancelled"]

    assert run(command).returncode == 0  # resumes: a new job, the same run directory
    killed = latest_job(run_dir).job_id
    assert killed != cancelled
    next_checkpoint = run_dir / "checkpoints" / "step_000000010"
    wait_until(next_checkpoint.exists, "the next checkpoint to be started")
    subprocess.run(["scontrol", "suspend", killed], check=True)  # frozen where it is, mid-checkpoint
    second = run(command)  # two jobs writing one run directory would overwrite each other's checkpoints
    assert second.returncode == 2
    assert f"already has job {killed} (SUSPENDED)" in second.stderr
    for pid in _job_processes(killed):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["scontrol", "resume", killed], check=True)  # its srun sees the tasks gone
    wait_until(lambda: not in_queue(killed), "the killed job to end")
    assert slurm_states(killed) == ["FAILED"]
    assert latest_job(run_dir).attempts[-1].reason is None  # killed: no chance to say why
    last_complete = complete_checkpoints(run_dir)[-1][0]

    result = run([*command, "--wait"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert losses(run_dir) == losses(reference)
    [attempt] = latest_job(run_dir).attempts
    assert (attempt.start_step, attempt.end_step, attempt.reason) == (last_complete, UPDATES, "done")


def _job_processes(job_id: str) -> list[int]:
    """The PIDs of the job's tasks and their loader workers (not slurmstepd: the node's daemons stay up)."""
    listed = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listed.splitlines()[1:] if line.split() and line.split()[0] != "-1"]
    return [pid for pid in pids if "python" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def test_bad_config_is_refused_before_submission(slurm, demo_shards, tmp_path):
    name = f"refused-{tmp_path.name}"  # other tests may submit meanwhile: this one looks for its own job only
    command = launch_command(demo_shards, tmp_path / "run", "optim.lr=-1", f"cluster.job_name={name}")
    result = run([*command, f"--partition={slurm}"])
    assert result.returncode == 2
    assert "optim.lr=-1.0 must be positive" in result.stderr
    accounted = ["sacct", "--allocations", "--noheader", "--parsable2", "-o", "JobID", "--name", name]
    assert subprocess.run(accounted, capture_output=True, text=True, check=True).stdout == "", "nothing may be queued"
    assert not (tmp_path / "run").exists()


def test_nightly_probes_on_slurm_and_queues_the_next_night(slurm, reference, probe_data, tmp_path):
    run_dir = Path(shutil.copytree(reference, tmp_path / "run", symlinks=True))
    for step in (5, 10, 15):  # only the newest checkpoint is left to probe: a shorter job
        (run_dir / "checkpoints" / f"step_{step:09d}" / "COMPLETE").unlink()
    command = [MUSIC2VEC, "nightly", str(run_dir), "--tasks", "demo_instruments", "--data-root", str(probe_data),
               "--cache-dir", str(tmp_path / "cache"), "--executor", "slurm", "--every", "1h", "--gpus", "0",
               "--cpus-per-task", "1", "--time", "10", f"--partition={slurm}", "--wait"]  # fmt: skip
    submitted_at = time.time()
    result = run(command)
    finished_at = time.time()
    assert result.returncode == 0, result.stderr[-3000:]
    first = re.search(r"nightly probe job (\d+)", result.stdout).group(1)
    following = re.search(r"the next one is job (\d+)", result.stdout).group(1)
    try:
        wait_until(lambda: slurm_states(first) == ["COMPLETED"], "sacct to record the job's end", timeout=60)
        assert {row["step"] for row in read_results(run_dir)} == {20}
        assert (run_dir / "probes" / "jobs" / first / f"{first}_0_log.out").is_file()
        listed = ["squeue", "--noheader", "--jobs", following, "--format", "%T %r %j"]
        assert subprocess.run(listed, capture_output=True, text=True, check=True).stdout.split() == [
            "PENDING",
            "BeginTime",
            "music2vec-nightly",
        ]
        begin = subprocess.run(["scontrol", "show", "job", following], capture_output=True, text=True, check=True)
        start = re.search(r"StartTime=(\S+)", begin.stdout).group(1)
        begins = time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S"))
        # an interval after this job started, which was between its submission and its end
        assert submitted_at + 3600 - 60 < begins < finished_at + 3600 + 60
    finally:
        subprocess.run(["scancel", following], check=False)


def test_a_corpus_is_sharded_by_a_slurm_job_array(slurm, corpus, tmp_path):
    """Two array tasks, each a part of the corpus on one CPU; the last to finish merges: the same bytes as the two
    parts written in this process."""
    out = tmp_path / "shards"
    command = [MUSIC2VEC, "shard", str(corpus), "--out", str(out), "--clip-seconds=6", "--min-seconds=5.5",
               "--shard-max-count=4", "--jobs=1", "--executor=slurm", "--array=2", "--time=10",
               f"--partition={slurm}", "--wait"]  # fmt: skip
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    array = re.search(r"job array (\d+): 2 of 2 parts", result.stdout).group(1)
    wait_until(lambda: slurm_states(array) == ["COMPLETED", "COMPLETED"], "sacct to record both tasks' ends", 60)
    assert (out / "jobs" / f"{array}_0" / f"{array}_0_0_log.out").is_file()
    reference = tmp_path / "reference"
    for index in range(2):
        write_shards([str(corpus)], reference, TEST_PARAMS, progress=False, part=Part(index, 2))
    merge_parts(reference)
    assert tree(out) == tree(reference)


def test_a_requeued_shard_task_resumes_its_part(slurm, corpus, tmp_path):
    """The time-limit signal reaches a task after some shards of its part, before or while it waits on a FIFO among
    its inputs: it stops before its next input and is requeued, and (the input made real meanwhile) finishes its
    part from its journal; the merged set is the bytes of a run never interrupted."""
    blocker, reference, out, command = blocked_run(corpus, tmp_path)
    part = next(Part(index, 2) for index in range(2) if Part(index, 2).holds(blocker.name))
    reference, listing = tmp_path / "reference-parts", command[2]
    blocker.unlink()
    sf.write(blocker, tone(13.0, 16_000, seed=99), 16_000)  # as blocked_run wrote it for its reference
    for index in range(2):
        write_shards([listing], reference, TEST_PARAMS, progress=False, part=Part(index, 2))
    merge_parts(reference)
    reference_input = Path(shutil.copy(blocker, tmp_path / "blocker.wav"))
    blocker.unlink()
    os.mkfifo(blocker)
    flags = ["--executor=slurm", "--array=2", "--jobs=1", "--time=10", f"--partition={slurm}", "--wait"]
    process = subprocess.Popen([*command[:-2], *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = part.folder(out) / "progress.jsonl"
    wait_until(lambda: journal.is_file() and journal.read_text().count("\n") >= 1, "the shards before the FIFO")
    array = re.search(r"job array (\d+)", process.stdout.readline()).group(1)
    subprocess.run(["scancel", "--signal=USR2", f"{array}_{part.index}"], check=True)
    time.sleep(2)
    feed(blocker, reference_input.read_bytes())  # the task is asked to stop; one that waits at the FIFO goes on
    wait_until(lambda: "REQUEUED" in slurm_states(f"{array}_{part.index}"), "the task to be requeued", 60)
    blocker.unlink()
    sf.write(blocker, tone(13.0, 16_000, seed=99), 16_000)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors[-3000:]
    assert tree(out) == tree(reference)


def feed(fifo: Path, data: bytes) -> None:
    """Write `data` to whoever has `fifo` open for reading; nothing when nobody has (the reader stopped earlier)."""
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader
        return
    os.set_blocking(descriptor, True)
    try:
        os.write(descriptor, data)
    except BrokenPipeError:
        pass  # the reader gave up on a stream it cannot seek in; the input is read again after the requeue
    finally:
        os.close(descriptor)
