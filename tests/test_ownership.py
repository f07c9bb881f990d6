"""One owner per run directory (its lease), and nobody else writing into it: real processes, real files."""

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from test_reliability import MUSIC2VEC, run, train

from cluster.lease import GENERATION, Lease, RunDirBusyError, holder
from trainer.layout import LEASES, complete_checkpoints
from trainer.metrics import read_metrics

CLAIMANTS = 8


def _claim_together(
    run_dir: str, start: multiprocessing.Barrier, done: multiprocessing.Barrier, results: multiprocessing.Queue
) -> None:
    lease = Lease("train")
    start.wait()
    try:
        lease.claim(Path(run_dir))
        results.put(("won", os.getpid()))
    except RunDirBusyError as error:
        results.put(("refused", str(error)))
    done.wait()  # alive until every claimant has looked: a winner that exited would be gone, its lease stale


def claim_at_once(run_dir: Path) -> list[tuple[str, object]]:
    """CLAIMANTS processes claim `run_dir` at the same moment; what each got."""
    context = multiprocessing.get_context("fork")
    start, done, results = context.Barrier(CLAIMANTS), context.Barrier(CLAIMANTS), context.Queue()
    processes = [
        context.Process(target=_claim_together, args=(str(run_dir), start, done, results)) for _ in range(CLAIMANTS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return outcomes


@pytest.mark.parametrize("before", ["free", "stale"])
def test_of_simultaneous_claims_exactly_one_wins(tmp_path, before):
    """On a free run directory, and on one whose lease names a process that is gone (each claimant then takes it
    over, and exactly one of them creates the next generation)."""
    if before == "stale":
        gone = subprocess.Popen(["true"])
        gone.wait()
        (tmp_path / LEASES).mkdir()
        (tmp_path / LEASES / "000000000.json").write_text(
            json.dumps(
                {"token": "old", "command": "train", "host": os.uname().nodename, "pid": gone.pid, "started": None}
                | {"job_id": None, "executor": None, "restart": None, "since": 0.0}
            )
        )
    outcomes = claim_at_once(tmp_path)
    winners = [pid for outcome, pid in outcomes if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert holder(tmp_path).pid == winners[0]
    refusals = [message for outcome, message in outcomes if outcome == "refused"]
    assert all(f"pid {winners[0]} on " in message for message in refusals), refusals
    [left] = (tmp_path / LEASES).iterdir()  # no drafts left behind, superseded generations removed
    assert GENERATION.fullmatch(left.name)


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_runs_lease_is_taken_over(demo_shards, tmp_path):
    """A run frozen in the middle of training holds its directory: a second `train` and a `launch` are refused,
    naming it. Killed, its lease is stale: the next run takes it over, says so, resumes and releases it."""
    run_dir = tmp_path / "run"
    command = train(demo_shards, run_dir, 6, "train.checkpoint_every=2")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: complete_checkpoints(run_dir), first)
        os.killpg(first.pid, signal.SIGSTOP)
        second = run(command)
        assert second.returncode == 2
        assert f"{run_dir} is in use by music2vec train (pid {first.pid} on" in second.stderr
        launch = [MUSIC2VEC, "launch", *command[2:], "--executor=local", "--gpus-per-node=0", "--dry-run"]
        assert f"(pid {first.pid} on" in run(launch).stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over {run_dir} from music2vec train (pid {first.pid}" in resumed.stderr
    assert f"process {first.pid} on {os.uname().nodename} is gone" in resumed.stderr
    assert [entry["step"] for entry in read_metrics(run_dir)][-1] == 6
    assert holder(run_dir) is None  # released at the end


@pytest.mark.slow
def test_a_holder_whose_scheduler_does_not_answer_is_busy_unless_taken_over(demo_shards, tmp_path):
    """A lease of a SLURM job on another node, and a SLURM controller that cannot be reached (a real squeue, a
    configuration naming a port where nothing listens)."""
    run_dir = tmp_path / "run"
    (run_dir / LEASES).mkdir(parents=True)
    lease = {"token": "t", "command": "train", "host": "node-elsewhere", "pid": 4242, "started": None}
    lease |= {"job_id": "4242", "executor": "slurm", "restart": 0, "since": time.time()}
    (run_dir / LEASES / "000000000.json").write_text(json.dumps(lease))
    env = os.environ | {"SLURM_CONF": str(_unreachable_slurm(tmp_path))}
    env.pop("SLURM_JOB_ID", None)

    command = train(demo_shards, run_dir, 2)
    refused = run(command, env=env)
    assert refused.returncode == 2
    assert "the SLURM scheduler did not answer" in refused.stderr
    assert "pass --take-over" in refused.stderr
    taken = run([*command, "--take-over"], env=env)
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "took over" in taken.stderr
    assert "slurm job 4242" in taken.stderr


def _unreachable_slurm(tmp_path: Path) -> Path:
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
        "SlurmctldTimeout=1\nMessageTimeout=1\nTCPTimeout=1\n"  # give up at once rather than retry for 18 s
        "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=localhost Default=YES\n"
    )
    return conf


@pytest.mark.slow
def test_a_run_directory_is_its_users_alone(demo_shards, tmp_path):
    """Created without write permission for group and others, everything in it too; a folder in it made
    group-writable is refused at the next start, unless train.shared_group opts a project folder in."""
    run_dir = tmp_path / "run"
    assert run(train(demo_shards, run_dir, 4)).returncode == 0
    for path in [run_dir, *run_dir.rglob("*")]:
        assert not path.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path

    folder = complete_checkpoints(run_dir)[-1][1]
    folder.chmod(0o775)
    refused = run(train(demo_shards, run_dir, 4))
    assert refused.returncode == 2
    assert f"{folder} can be written by the group" in refused.stderr
    assert "train.shared_group=true" in refused.stderr

    shared = run(train(demo_shards, run_dir, 4, "train.shared_group=true"))
    assert shared.returncode == 0, shared.stderr[-3000:]
    folder.chmod(0o777)
    refused = run(train(demo_shards, run_dir, 4, "train.shared_group=true"))
    assert refused.returncode == 2
    assert f"{folder} can be written by every user" in refused.stderr


def _wait_for(condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, "the run ended early"
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_a_run_whose_lease_was_taken_over_stops_before_its_next_checkpoint(demo_shards, tmp_path):
    """Someone took the run directory over (`--take-over` on another node, with this run in fact alive): at its next
    checkpoint the run sees the lease is no longer its own and stops without writing."""
    run_dir = tmp_path / "run"
    command = train(demo_shards, run_dir, 200, "train.checkpoint_every=2")
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: complete_checkpoints(run_dir), running)
        [ours] = (run_dir / LEASES).glob("*.json")
        other = json.loads(ours.read_text()) | {"token": "theirs", "host": "node-elsewhere", "pid": 7}
        (run_dir / LEASES / f"{int(ours.stem) + 1:09d}.json").write_text(json.dumps(other))  # as a claim writes it
        taken_at = complete_checkpoints(run_dir)[-1][0]
        _, errors = running.communicate(timeout=300)
    finally:
        running.kill()
    assert running.returncode == 1
    assert f"{run_dir} is now held by music2vec train (pid 7 on node-elsewhere" in errors
    assert "no checkpoint was written" in errors
    assert complete_checkpoints(run_dir)[-1][0] <= taken_at + 2  # at most the one being written as it was taken
    assert holder(run_dir).host == "node-elsewhere"  # and it leaves the new holder's lease alone
