"""Shared fixtures: a small corpus of real audio files, shards written from it by the project's writer, demo music,
and one training rank in this process."""

import contextlib
import csv
import fcntl
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import ShardParams, write_shards


def tone(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """A few random harmonics with a little noise: distinct per seed, never silent."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 110 * 2 ** (rng.integers(0, 36) / 12)
    wave = sum(np.sin(2 * np.pi * pitch * h * t + rng.uniform(0, 6)) / h for h in range(1, 5))
    wave = 0.2 * wave + 0.01 * rng.standard_normal(t.size)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def write_corpus(folder: Path, files: int, seconds: float = 13.0) -> list[Path]:
    """`files` audio files in turns of format, rate and channel count."""
    formats = [("wav", 44_100, 2), ("flac", 22_050, 1), ("ogg", 48_000, 2), ("wav", 16_000, 1)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        extension, rate, channels = formats[index % len(formats)]
        path = folder / f"track{index:03d}.{extension}"
        sf.write(path, tone(seconds, rate, seed=index, channels=channels), rate)
        paths.append(path)
    return paths


# Short clips keep the tests fast; 6 s clips still hold a 5 s crop (249 frames).
TEST_PARAMS = ShardParams(clip_seconds=6.0, min_seconds=5.5, max_count=4)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, files=16)
    return folder


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> Path:
    """16 files x 13 s -> 2 clips of 6 s each (the 1 s tails are dropped) = 32 clips in 8 shards of 4."""
    out = tmp_path_factory.mktemp("shards")
    write_shards([str(corpus)], out, TEST_PARAMS, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo music (12 excerpts of 8 s) in 6 shards: what the trainer tests train on."""
    from data.demo import write_demo_corpus

    folder = tmp_path_factory.mktemp("demo")
    write_demo_corpus(folder / "audio", clips=12, seconds=8.0)
    write_shards([str(folder / "audio")], folder / "shards", ShardParams(clip_seconds=8, min_seconds=4, max_count=2))
    return folder / "shards" / "manifest.json"


@pytest.fixture(scope="session")
def two_rank_runs(demo_shards, tmp_path_factory) -> dict[int, Path]:
    """Run directories of `music2vec train` under torchrun with two ranks, 8 updates, ZeRO-2 and ZeRO-3 (by stage)."""
    from test_train import command, run, torchrun

    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"two_ranks_zero{stage}")
        result = run(torchrun(2, command(demo_shards, run_dir, "optim.max_updates=8", f"train.zero_stage={stage}")))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[stage] = run_dir
    return runs


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory) -> Path:
    """The demo probe tasks' clips, fewer than the demo writes (once per test session)."""
    from probes.datasets import demo

    root = tmp_path_factory.mktemp("probe_data")
    demo.prepare(root, clips={"train": 64, "valid": 16, "test": 24})  # enough to train and score heads on
    return root


@pytest.fixture(scope="module")
def one_rank():
    """One gloo rank in this process, as `music2vec train` starts it. What that changes is taken back afterwards:
    the variables it exports (processes that other tests start must not inherit this rank's port), the signal
    handlers `train` installs, and DeepSpeed's process groups (DeepSpeed's own teardown forgets the ones it cached,
    so that the next rank started in this process gets new ones)."""
    import deepspeed.comm

    from cluster.environment import from_environment, init_distributed
    from trainer.stop import STOP_SIGNALS

    saved_environment = dict(os.environ)
    saved_handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    init_distributed(from_environment())
    yield
    deepspeed.comm.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved_environment)
    for number, handler in saved_handlers.items():
        signal.signal(number, handler)


LOCAL_SLURM = Path(__file__).resolve().parents[1] / "cluster" / "testing" / "local_slurm.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> str:
    """The local cluster's default partition (its one node on this machine). The cluster is started for these tests
    unless it was already running, and then stopped when the last test process using it is done: pytest-xdist's
    workers share one cluster, registered in the folder above their own temporary folders (as xdist suggests)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root: it installs packages and runs munged, slurmctld and slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    users = tmp_path_factory.getbasetemp().parent / "local-slurm-users"
    me = users / str(os.getpid())
    with _cluster_lock(users):
        if subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, check=False).returncode != 0:
            started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, check=False)
            assert started.returncode == 0, f"local_slurm.sh start failed:\n{started.stderr[-3000:]}"
            (users / "started").touch()  # by the tests: theirs to stop
        me.touch()
    yield next(partition.rstrip("*") for partition in partitions() if partition.endswith("*"))
    with _cluster_lock(users):
        me.unlink()
        if (users / "started").exists() and not _live(users):
            subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, check=True)
            (users / "started").unlink()


@contextlib.contextmanager
def _cluster_lock(users: Path) -> Iterator[None]:
    users.mkdir(mode=0o700, exist_ok=True)
    with (users / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live(users: Path) -> list[Path]:
    """The registrations of test processes still alive (one that was killed left its file behind)."""
    return [path for path in users.iterdir() if path.name.isdigit() and Path(f"/proc/{path.name}").exists()]


@pytest.fixture(scope="session")
def twohosts(slurm) -> str:  # noqa: ARG001 - the cluster it starts
    """The local cluster's partition of two hosts, m2v-node1 and m2v-node2, each in network and UTS namespaces of its
    own; the tests using it are skipped, with the reason, where namespaces cannot be made."""
    if "twohosts" not in partitions():
        status = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True, check=False)
        said = [line for line in status.stdout.splitlines() if line.startswith("twohosts unavailable")]
        pytest.skip(f"no two-host SLURM: {said[0] if said else 'the running cluster has no twohosts partition'}")
    return "twohosts"


def partitions() -> list[str]:
    """The local cluster's partitions, the default one marked with *."""
    listed = subprocess.run(["sinfo", "--noheader", "-o", "%P"], capture_output=True, text=True, check=True)
    return listed.stdout.split()


PROBE_TASK_EXAMPLE = Path(__file__).resolve().parent / "probe_task"  # a task file of one's own


def melody(register: str, seed: int, seconds: float = 3.0) -> np.ndarray:
    """Notes of a random melody, two octaves apart between the registers."""
    rng = np.random.default_rng(seed)
    base = 110.0 if register == "low" else 440.0
    notes = base * 2 ** (rng.integers(0, 12, size=6) / 12)
    t = np.arange(int(seconds * 16_000 / len(notes))) / 16_000
    return np.concatenate([0.3 * np.sin(2 * np.pi * f * t) for f in notes]).astype(np.float32)


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """The shipped example of a probe task file (tests/probe_task), with the clips its table lists."""
    folder = Path(shutil.copytree(PROBE_TASK_EXAMPLE, tmp_path / "probe_task"))
    with (folder / "register.csv").open() as table:
        for seed, row in enumerate(csv.DictReader(table)):
            (folder / row["audio"]).parent.mkdir(exist_ok=True)
            sf.write(folder / row["audio"], melody(row["label"], seed), 16_000)
    return folder
