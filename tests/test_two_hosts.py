"""`music2vec launch --nodes 2` on a real two-host SLURM: the local cluster's `twohosts` partition, two slurmds each in
network and UTS namespaces of its own (cluster/testing/local_slurm.sh), one rank per host, gloo over the bridge.

Every run must log exactly the per-update losses of the uninterrupted two-host run: no update lost or repeated
across requeues and lost hosts.
"""

import itertools
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import LOCAL_SLURM
from test_slurm import UPDATES, in_queue, launch_command, losses, run, slurm_states, wait_until

from cluster.attempts import latest_job
from model import Music2Vec
from trainer.config import load_config
from trainer.layout import complete_checkpoints
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slurm

HOSTS = ("m2v-node1", "m2v-node2")
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def two_host_command(shards: Path, run_dir: Path, partition: str, *extra: str) -> list[str]:
    return [*launch_command(shards, run_dir), "--nodes=2", "--tasks-per-node=1", f"--partition={partition}", *extra]


def bridge_bytes(host: str) -> int:
    """Bytes through the host end of `host`'s veth pair, both ways: everything it exchanged with the other host."""
    link = Path("/sys/class/net") / f"m2v-veth{host[-1]}" / "statistics"
    return int((link / "rx_bytes").read_text()) + int((link / "tx_bytes").read_text())


@pytest.fixture(scope="module")
def reference(twohosts, demo_shards, tmp_path_factory) -> tuple[Path, int]:
    """The uninterrupted two-host run, and the bytes the second host exchanged over the bridge meanwhile."""
    run_dir = tmp_path_factory.mktemp("twohosts") / "reference"
    before = bridge_bytes(HOSTS[1])
    result = run(two_host_command(demo_shards, run_dir, twohosts, "--wait"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return run_dir, bridge_bytes(HOSTS[1]) - before


@pytest.mark.usefixtures("twohosts")
def test_status_finds_every_daemon_that_start_recorded():
    """The two hosts' slurmds are started through nsenter, and the binary is an alternatives link (slurmd-wlm):
    `status`, and a second `start` (which test processes sharing the cluster run), must still know them as alive,
    or the second `start` would restart the cluster under the first one's jobs."""
    status = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stdout
    assert {"slurmd-m2v-node1 running", "slurmd-m2v-node2 running"} <= set(status.stdout.splitlines())
    again = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, check=True)
    assert "already running" in again.stderr


def test_one_rank_runs_on_each_host_and_they_meet_over_the_bridge(reference):
    run_dir, exchanged = reference
    job = latest_job(run_dir)
    [attempt] = job.attempts
    assert (attempt.start_step, attempt.end_step, attempt.reason) == (0, UPDATES, "done")
    assert attempt.details["hosts"] == list(HOSTS)
    assert attempt.details["host"] == HOSTS[0]  # rank 0, whose address is the rendezvous
    for rank, host in enumerate(HOSTS):
        log = (run_dir / "jobs" / job.job_id / f"{job.job_id}_{rank}_log.out").read_text()
        assert f"hostname={host}, local_rank=0(1), node={rank}(2), global_rank={rank}(2)" in log
    assert len(losses(run_dir)) == UPDATES
    # ZeRO-2 over two ranks moves at least half the gradients and half the weights of every update between them; a
    # rendezvous over anything but the bridge (each host's loopback is its own) would leave the link idle.
    parameter_bytes = 4 * sum(p.numel() for p in Music2Vec(load_config(TINY).model).parameters())
    assert exchanged > UPDATES * parameter_bytes


def test_a_two_host_job_checkpoints_on_the_time_limit_signal_requeues_and_finishes(
    reference, twohosts, demo_shards, tmp_path
):
    """USR2 is what SLURM sends `signal_delay_s` before the time limit; a second one comes while the first is being
    handled. Both ranks checkpoint, into one folder from two hosts; the job requeues itself, and the next attempt, on
    both hosts again, finishes the run."""
    run_dir = tmp_path / "run"
    command = two_host_command(demo_shards, run_dir, twohosts, "--wait")
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: len(read_metrics(run_dir)) >= 7, "training to pass update 7")
    job_id = latest_job(run_dir).job_id
    for _ in range(2):  # back to back: a second signal that came after the requeue would hit the next attempt
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output

    assert losses(run_dir) == losses(reference[0])  # every update exactly once, each the same as uninterrupted
    wait_until(lambda: slurm_states(job_id)[-1] != "RUNNING", "the batch script to end")
    states = slurm_states(job_id)
    assert (states[0], states[-1]) == ("REQUEUED", "COMPLETED")
    attempts = latest_job(run_dir).attempts
    first, last = attempts[0], attempts[-1]
    assert first.reason == "requeue (SIGUSR2)"
    assert 7 <= first.end_step < UPDATES
    assert first.end_step in dict(complete_checkpoints(run_dir))  # the checkpoint written for the requeue
    assert sorted(path.name for path in (run_dir / "checkpoints").glob(f"step_{first.end_step:09d}/rank_*.pt")) == [
        "rank_00000.pt",
        "rank_00001.pt",  # written on the other host, into the same shared folder
    ]
    assert (last.end_step, last.reason) == (UPDATES, "done")
    for before, after in itertools.pairwise(attempts):
        assert after.restart == before.restart + 1
        assert after.start_step == before.end_step
        assert after.details["hosts"] == list(HOSTS)


def test_a_rank_killed_on_one_host_leaves_a_run_that_resumes(reference, twohosts, demo_shards, tmp_path):
    """The second host's task dies without a word (SIGKILL, as when a node is lost): the job ends, and launching
    again resumes from the last complete checkpoint on both hosts."""
    run_dir = tmp_path / "run"
    command = two_host_command(demo_shards, run_dir, twohosts)
    assert run(command).returncode == 0
    wait_until(lambda: len(read_metrics(run_dir)) >= 8, "training to pass update 8")
    job_id = latest_job(run_dir).job_id
    killed = [pid for pid in processes_in(HOSTS[1]) if "submitit" in command_line(pid)]
    assert killed, "the rank on the second host runs there"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not in_queue(job_id), "the job to end")
    wait_until(lambda: slurm_states(job_id) != ["RUNNING"], "sacct to record the job's end", timeout=60)
    assert slurm_states(job_id) == ["FAILED"]
    last_complete = complete_checkpoints(run_dir)[-1][0]
    assert last_complete >= 5

    result = run([*command, "--wait"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert losses(run_dir) == losses(reference[0])
    resumed = latest_job(run_dir).attempts[-1]
    assert (resumed.start_step, resumed.end_step, resumed.reason) == (last_complete, UPDATES, "done")


def processes_in(host: str) -> list[int]:
    """Every process in `host`'s network namespace: its slurmd and what that started."""
    listed = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True, check=True)
    return [int(pid) for pid in listed.stdout.split()]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # it ended meanwhile
