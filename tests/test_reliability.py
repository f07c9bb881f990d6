"""Faults injected into real runs and real files: what survives, what the user is told (docs/RELIABILITY.md)."""

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
import torch
from conftest import TEST_PARAMS
from test_train import command, run

from data import write_shards
from data.jsonlines import read
from trainer.checkpoint import file_digests, verify
from trainer.config import load_config, save_config
from trainer.layout import complete_checkpoints, tag
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # faults injected into training runs

ROOT = Path(__file__).resolve().parents[1]
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")


def train(shards: Path, run_dir: Path, updates: int, *extra: str) -> list[str]:
    """test_train's command with `updates` updates, a checkpoint every 4 and a log line every 2 (later overrides
    win)."""
    return command(
        shards, run_dir, f"optim.max_updates={updates}", "train.checkpoint_every=4", "train.log_every=2", *extra
    )


class PlantedCode:
    """What an attacker pickles into a checkpoint file: loading it unpickled would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def plant(run_dir: Path, source: Path, evidence: Path) -> Path:
    """A copy of `source` at a step far ahead, one file replaced by a pickle that runs a command, and a COMPLETE
    that describes it faithfully: everything an attacker with write access to the run directory can do."""
    planted = run_dir / "checkpoints" / tag(999_999_999)
    shutil.copytree(source, planted)
    optimizer = next(planted.glob("zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": PlantedCode(evidence)}, optimizer)
    marker = json.loads((planted / "COMPLETE").read_text())
    marker |= {"step": 999_999_999, "files": file_digests(planted)}
    (planted / "COMPLETE").write_text(json.dumps(marker))
    return optimizer


def fsynced_before_complete(trace: Path, folder: Path) -> set[str]:
    """Names of the files in `folder` that some process fsynced before COMPLETE was created there (from strace)."""
    synced: set[str] = set()
    for line in trace.read_text().splitlines():
        if f'"{folder}/COMPLETE"' in line and "openat(" in line:
            return synced
        if match := re.search(r"fsync\(\d+<([^>]+)>\)", line):
            path = Path(match.group(1))
            if path.parent == folder:
                synced.add(path.name)
            elif path == folder:
                synced.add(".")
    raise AssertionError(f"{folder}/COMPLETE was never created")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace shows which files a run fsyncs")
def test_checkpoints_are_durable_verified_and_never_run_code(demo_shards, tmp_path):
    """A run under strace: every checkpoint file is fsynced before its COMPLETE. Then the run directory is moved,
    a file of the newest checkpoint truncated, a checkpoint with a code-running pickle planted ahead of it, and the
    last metrics line cut; logging and retention change. The resume reports both checkpoints, runs no code, and
    continues from the one before them (without --allow-config-change), then sets the damaged one aside."""
    first, trace = tmp_path / "first", tmp_path / "strace.log"
    strace = ["strace", "-f", "-y", "-qq", "--seccomp-bpf", "-e", "trace=openat,fsync", "-o", str(trace)]
    result = run([*strace, *train(demo_shards, first, 12)])
    assert result.returncode == 0, result.stderr[-3000:]
    for step, folder in complete_checkpoints(first):
        files = {path.name for path in folder.iterdir()} - {"COMPLETE"}
        assert files | {"."} <= fsynced_before_complete(trace, folder), f"step {step}"

    run_dir, evidence = tmp_path / "renamed", tmp_path / "planted-code-ran"
    first.rename(run_dir)
    damaged = run_dir / "checkpoints" / tag(12) / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    planted = plant(run_dir, run_dir / "checkpoints" / tag(4), evidence)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 13, "loss": 1.2')  # a crash in the middle of a line

    result = run(train(demo_shards, run_dir, 12, "train.log_every=3", "train.keep_last=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not evidence.exists(), "the planted pickle ran"
    refused = "refused: it holds pickled objects that could run code when loaded (the first: posix.system)"
    assert f"{planted}: {refused}" in result.stderr
    assert f"{damaged}: its content changed since it was written" in result.stderr
    assert f"resuming {run_dir} from {tag(8)}" in result.stdout
    assert [entry["step"] for entry in read_metrics(run_dir)] == list(range(1, 13))
    assert [step for step, _ in complete_checkpoints(run_dir)] == [12, 999_999_999]  # keep_last=1
    digest = load_config(run_dir / "config.yaml").digest()
    verify(run_dir / "checkpoints" / tag(12), config_digest=digest)
    (kept_aside,) = (run_dir / "checkpoints").glob(f"{tag(12)}.unusable-*")  # the damaged one, never deleted
    assert (kept_aside / "COMPLETE").is_file()


def test_a_run_with_no_usable_checkpoint_is_refused_and_left_as_it_is(demo_shards, tmp_path):
    result = run(train(demo_shards, tmp_path, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "checkpoints" / tag(4)
    teacher = folder / "teacher.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:100])
    before = files_and_contents(tmp_path)
    result = run(train(demo_shards, tmp_path, 4))
    assert result.returncode == 2
    assert "none of the 1 complete checkpoints" in result.stderr
    assert f"{teacher}: its content changed" in result.stderr
    assert files_and_contents(tmp_path) == before


def files_and_contents(run_dir: Path) -> dict[Path, bytes]:
    """Every file of a run directory but its lease (each start records who held the directory, and released it)."""
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and "leases" not in path.parts}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="mounts a small tmpfs")
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(demo_shards, tmp_path):
    """The run directory on a 6 MB filesystem: the first checkpoint (about 4 MB) fits, the second does not."""
    disk, copy = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    script = (
        f'mount -t tmpfs -o size=6m tmpfs "{disk}" && {" ".join(train(demo_shards, disk / "run", 12))};'
        f' status=$?; cp -a "{disk}/run" "{copy}"; exit $status'
    )
    result = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"the checkpoint {disk / 'run' / 'checkpoints' / tag(8)} could not be written" in result.stderr
    assert re.search(r"\(\d+\.\d MiB free of 6 MiB on its filesystem\)", result.stderr), result.stderr[-2000:]
    assert [step for step, _ in complete_checkpoints(copy)] == [4]
    verify(copy / "checkpoints" / tag(4), config_digest=None)


def test_a_rank_that_hangs_ends_the_run_within_the_collective_timeout(demo_shards, tmp_path):
    """Two ranks started by hand, as srun starts them (no launcher that kills the others): one is frozen with
    SIGSTOP after the first checkpoint; the other gives up after train.collective_timeout_s instead of waiting for
    torch's default 30 minutes, and the checkpoint stays usable."""
    cmd = train(demo_shards, tmp_path, 200, "train.collective_timeout_s=15", "train.checkpoint_every=2")
    ranks = start_ranks(cmd, port_offset=0)
    try:
        deadline = time.monotonic() + 300
        while not complete_checkpoints(tmp_path):
            assert all(rank.poll() is None for rank in ranks)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        _, stderr = ranks[0].communicate(timeout=240)  # well past 15 s, well short of 30 minutes
        assert ranks[0].returncode != 0
        assert "timed out" in stderr.lower() or "timeout" in stderr.lower(), stderr[-3000:]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    _, folder = complete_checkpoints(tmp_path)[-1]
    verify(folder, config_digest=None)


# Two ranks build the engine; rank 1 then freezes; rank 0 trains on, so the first thing it waits in is DeepSpeed's
# gradient all-reduce, which runs over a process group of DeepSpeed's own making.
TRAIN_BESIDE_A_FROZEN_RANK = """
import os, signal, sys
import numpy as np, torch
from cluster.environment import from_environment, init_distributed
from data import span_mask
from model import Music2Vec
from trainer.config import load_config
from trainer.engine import Engine

cfg = load_config(sys.argv[1], sys.argv[2:])
init_distributed(from_environment(), timeout_s=cfg.train.collective_timeout_s)
engine = Engine(Music2Vec(cfg.model), cfg, world_size=2)
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGSTOP)
samples = round(cfg.data.crop_seconds * 16_000)
mask = torch.from_numpy(span_mask(2, cfg.model.num_frames(samples), rng=np.random.default_rng(0)))
while True:
    loss, _ = engine.forward(torch.randn(2, samples), mask)
    engine.backward(loss)
    engine.step()
"""


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3 also gathers the weights over that group
def test_the_gradient_all_reduce_gives_up_within_the_collective_timeout(stage):
    """DeepSpeed creates its data-parallel groups without a timeout: they must take train.collective_timeout_s too,
    not torch's 30 minutes."""
    config = ["train.collective_timeout_s=10", f"train.zero_stage={stage}"]
    cmd = [sys.executable, "-c", TRAIN_BESIDE_A_FROZEN_RANK, str(ROOT / "configs" / "tiny.yaml"), *config]
    ranks = start_ranks(cmd, port_offset=150 + stage)
    try:
        _, stderr = ranks[0].communicate(timeout=240)  # well past 10 s, well short of 30 minutes
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 1
    assert "Timed out waiting 10000ms" in stderr, stderr[-3000:]


def test_a_write_that_fails_on_rank_0_alone_ends_both_ranks(demo_shards, tmp_path):
    """Rank 0 writes the export alone; a file where update 8's export folder goes makes that write fail. Both ranks
    end at once with the reason (rank 1 learns it from rank 0), well before train.collective_timeout_s, and update
    4's checkpoint verifies."""
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / tag(8)).write_text("in the way")
    ranks = start_ranks(train(demo_shards, tmp_path, 12, "train.collective_timeout_s=900"), port_offset=300)
    try:
        errors = [rank.communicate(timeout=600)[1] for rank in ranks]  # a wait for the timeout would fail here
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1], errors[0][-3000:]
    could_not = f"the checkpoint {tmp_path / 'checkpoints' / tag(8)} could not be written"
    assert f"{could_not}: FileExistsError" in errors[0]
    assert f"{could_not}: it failed on another rank" in errors[1]
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4]
    verify(tmp_path / "checkpoints" / tag(4), config_digest=None)


def start_ranks(cmd: list[str], *, port_offset: int) -> list[subprocess.Popen]:
    """Two ranks started by hand, as srun starts them: no launcher that would kill one when the other ends."""
    port = 29_000 + port_offset + os.getpid() % 300
    env = os.environ | {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [
        subprocess.Popen(
            cmd,
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


def test_every_append_only_file_survives_a_cut_line(corpus, tmp_path):
    """A crash in the middle of a line of each JSON-lines file; every command that reads it still works."""
    cut = '{"step": 3, "loss": 0.5'
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(ROOT / "configs" / "tiny.yaml"), run_dir / "config.yaml")
    line = {"loss": 1.0, "audio_seconds_per_s": 10.0, "step_time": 0.1}
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, **line}) + "\n" + cut)
    submitted = {"event": "submitted", "job_id": "1", "executor": "local"}
    (run_dir / "attempts.jsonl").write_text(json.dumps(submitted) + '\n{"event": "st')
    (run_dir / "probes").mkdir()
    row = {"step": 4, "task": "demo_key", "metric": "accuracy", "value": 0.75, "primary": True, "seed": 0}
    (run_dir / "probes" / "results.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n" + cut)
    result = run([MUSIC2VEC, "status", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert "demo_key/accuracy=0.750" in result.stdout
    for name in ("metrics.jsonl", "attempts.jsonl", "probes/results.jsonl"):
        assert f"{run_dir / name}: skipped line(s)" in result.stderr

    shards = tmp_path / "shards"  # the shard writer killed while journalling its first shard
    shards.mkdir()
    (shards / "progress.jsonl").write_text('{"shard": "shard-000000.tar", "sam')
    (shards / "rejected.jsonl").write_text('{"index": 0, "pa')
    manifest = write_shards([str(corpus)], shards, TEST_PARAMS, progress=False)
    assert manifest["total_samples"] == 32
    assert read(shards / "rejected.jsonl") == []
