"""`music2vec nightly` on a real run directory: probes each COMPLETE checkpoint once, TensorBoard, report, lock."""

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from probes.nightly import RunBusyError, nightly, nightly_runs, read_results, scalar_tag, write_report
from probes.probe import REGISTRY, ProbeSettings
from trainer.checkpoint import prune
from trainer.cli import main

pytestmark = pytest.mark.slow  # each test probes checkpoints of a trained run

ROOT = Path(__file__).resolve().parents[1]
MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
TASK = "demo_instruments"


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory) -> Path:
    """A tiny run with COMPLETE checkpoints at updates 3 and 6."""
    run_dir = tmp_path_factory.mktemp("nightly") / "run"
    cmd = [MUSIC2VEC, "train", str(ROOT / "configs" / "tiny.yaml"), f"data.shards={demo_shards}",
           f"train.run_dir={run_dir}", "optim.max_updates=6", "train.checkpoint_every=3"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A fresh copy per test, so each starts with nothing probed."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Shared by the tests: each checkpoint's features are extracted once."""
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture
def probe_everything(run_dir, probe_data, cache):
    settings = ProbeSettings(data_root=probe_data, seeds=(0, 1), cache=cache, progress=False)
    return lambda: nightly(run_dir, [TASK], settings)


def test_probes_every_complete_checkpoint_once(run_dir, probe_everything):
    unfinished = run_dir / "checkpoints" / "step_000000009"  # a checkpoint still being written: no COMPLETE
    unfinished.mkdir()
    shutil.copytree(run_dir / "exports" / "step_000000006", run_dir / "exports" / "step_000000009")

    rows = probe_everything()
    assert {(row["step"], row["seed"]) for row in rows} == {(3, 0), (3, 1), (6, 0), (6, 1)}
    assert read_results(run_dir) == rows

    tensorboard = EventAccumulator(str(run_dir / "tb"))
    tensorboard.Reload()
    auc = tensorboard.Scalars(f"probe/{TASK}/roc_auc")
    assert [event.step for event in auc] == [3, 6]
    mean_at_3 = sum(row["value"] for row in rows if row["step"] == 3 and row["metric"] == "roc_auc") / 2
    assert auc[0].value == pytest.approx(mean_at_3)
    assert "train/loss" in tensorboard.Tags()["scalars"]  # beside the training curves, in the same tb/

    report = (run_dir / "probes" / "report.md").read_text()
    assert f"## {TASK}" in report
    assert "| 3 | roc_auc |" in report
    assert "| 6 | roc_auc |" in report
    assert "| 9 |" not in report
    assert (run_dir / "probes" / "report.png").read_bytes().startswith(b"\x89PNG")

    mean_at_6 = sum(row["value"] for row in rows if row["step"] == 6 and row["metric"] == "roc_auc") / 2
    status = subprocess.run([MUSIC2VEC, "status", str(run_dir)], capture_output=True, text=True, check=True).stdout
    assert status.splitlines()[1].endswith(f"@6 {TASK}/roc_auc={mean_at_6:.3f}")  # primary metric, mean of seeds

    assert probe_everything() == []  # a second run right after does nothing
    assert read_results(run_dir) == rows


def test_a_crash_midway_is_completed_without_duplicates(run_dir, probe_everything):
    rows = probe_everything()
    results = run_dir / "probes" / "results.jsonl"
    kept = [json.dumps(row) for row in rows if row["step"] == 3]
    results.write_text("\n".join(kept) + "\n" + json.dumps(rows[-1])[:25])  # step 6 lost, a line cut short

    again = probe_everything()
    assert {(row["step"], row["seed"]) for row in again} == {(6, 0), (6, 1)}
    keys = [(row["step"], row["seed"], row["metric"]) for row in read_results(run_dir)]
    assert sorted(keys) == sorted({(row["step"], row["seed"], row["metric"]) for row in rows})  # each exactly once


def test_two_jobs_never_probe_one_run_at_once(run_dir, probe_everything, probe_data):
    lock = run_dir / "probes" / "nightly.lock"
    lock.parent.mkdir()
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunBusyError, match="another nightly probe job"):
            probe_everything()
        command = [MUSIC2VEC, "nightly", str(run_dir), "--tasks", TASK, "--data-root", str(probe_data)]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0  # a busy run is skipped, not an error: cron will come back tomorrow
    assert "skipped" in result.stderr
    assert read_results(run_dir) == []


def test_a_local_nightly_job_probes_the_run_and_keeps_its_log_there(run_dir, probe_data, cache):
    command = [MUSIC2VEC, "nightly", str(run_dir), "--tasks", TASK, "--data-root", str(probe_data),
               "--seeds", "0", "--cache-dir", str(cache), "--executor", "local", "--gpus", "0"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitted local nightly probe job" in result.stdout
    assert f"new result rows {{'{run_dir.resolve()}': 4}}" in result.stdout  # 2 checkpoints x 2 metrics
    assert {row["step"] for row in read_results(run_dir)} == {3, 6}
    [log] = (run_dir / "probes" / "jobs").glob("local-*/*_log.out")
    assert "Starting with JobEnvironment" in log.read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--every", "24h"], "--every needs --executor slurm"),
        (["--executor", "local", "--every", "24h"], "--every needs --executor slurm"),
        (["--executor", "slurm", "--every", "tomorrow"], "--every 'tomorrow': expected a positive interval"),
        (["--executor", "local", "--tasks", "gtzan"], r"GTZAN/train_filtered.txt: missing"),
        (["--executor", "local", "--protocol", "jukemir"], "--protocol jukemir probes one hidden state at a time"),
    ],
)
def test_a_nightly_job_that_would_fail_is_refused_before_it_is_queued(run_dir, probe_data, flags, message, capsys):
    with pytest.raises(SystemExit) as exited:  # the command's own entry point, in this process
        main(["nightly", str(run_dir), "--tasks", TASK, "--data-root", str(probe_data), *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "probes").exists()


def test_a_pruned_checkpoint_and_a_failing_run_stop_no_other(trained, tmp_path, probe_data, cache, monkeypatch):
    """Three runs in one nightly job: in the first, training prunes the checkpoint being probed (between reading its
    config and its weights); the second has a damaged export; the third is fine. The first is probed where it still
    can be, the second is reported with its file, the third is probed in full, and every run gets its report."""
    pruned, broken, fine = (Path(shutil.copytree(trained, tmp_path / name)) for name in ("pruned", "broken", "fine"))
    weights = broken / "exports" / "step_000000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    task, examples = REGISTRY[TASK]

    def examples_while_training_prunes(*args):
        prune(pruned, keep_last=1, keep_every=0, current=6)  # what a checkpoint at update 6 does to update 3's
        return examples(*args)

    monkeypatch.setitem(REGISTRY, TASK, (task, examples_while_training_prunes))
    settings = ProbeSettings(data_root=probe_data, seeds=(0,), cache=cache, progress=False)
    outcomes = nightly_runs([pruned, broken, fine], [TASK], settings)

    assert outcomes[pruned] == 2  # update 6's two metrics
    assert outcomes[broken].startswith(f"failed: RuntimeError: probing {broken / 'checkpoints' / 'step_000000003'}")
    assert outcomes[fine] == 4
    assert {row["step"] for row in read_results(fine)} == {3, 6}
    for run in (pruned, broken, fine):
        assert (run / "probes" / "report.md").is_file()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace injects the error a filesystem without flock gives")
def test_a_filesystem_without_flock_is_named_with_what_to_do(run_dir, probe_data):
    command = ["strace", "-f", "-qq", "-e", "trace=flock", "-e", "inject=flock:error=ENOLCK", "-o", "/dev/null",
               MUSIC2VEC, "nightly", str(run_dir), "--tasks", TASK, "--data-root", str(probe_data)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 1
    lock = run_dir / "probes" / "nightly.lock"
    assert f"{lock}: cannot be locked (No locks available): this filesystem does not support flock" in result.stderr
    assert "1 run(s) failed" in result.stderr


def test_nightly_probes_a_task_file_and_refuses_a_broken_one_before_queueing(run_dir, cache, task_dir, capsys):
    register = str(task_dir / "register.yaml")
    assert main(["nightly", str(run_dir), "--task-file", register, "--seeds", "0", "--cache-dir", str(cache)]) == 0
    rows = read_results(run_dir)
    assert {(row["task"], row["metric"], row["step"]) for row in rows} == {
        ("register", "accuracy", 3),
        ("register", "accuracy", 6),
    }
    tensorboard = EventAccumulator(str(run_dir / "tb"))
    tensorboard.Reload()
    assert [event.step for event in tensorboard.Scalars("probe/register/accuracy")] == [3, 6]
    assert "## register" in (run_dir / "probes" / "report.md").read_text()

    other = Path(
        shutil.copytree(
            run_dir, run_dir.with_name("untouched"), symlinks=True, ignore=shutil.ignore_patterns("probes")
        )
    )
    (task_dir / "register.yaml").write_text((task_dir / "register.yaml").read_text().replace("multiclass", "classes"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["nightly", str(other), "--task-file", register, "--executor", "local", "--gpus", "0"])
    assert exited.value.code == 2
    assert "register.yaml: kind: 'classes' is not one of" in capsys.readouterr().err
    assert not (other / "probes").exists()  # nothing queued, nothing written


def test_nightly_layer_by_layer_with_the_random_init_as_reference(run_dir, probe_data, cache):
    """--layers and --random-init: rows, TensorBoard scalars and the report keyed by hidden state, step 0 being the
    run's model before its first update; a second night probes nothing again."""
    flags = ["--tasks", TASK, "--data-root", str(probe_data), "--seeds", "0", "--cache-dir", str(cache)]
    assert main(["nightly", str(run_dir), *flags, "--layers", "0", "4", "--random-init"]) == 0
    rows = read_results(run_dir)
    assert {(row["step"], row["head"]["layer"]) for row in rows} == {(s, layer) for s in (0, 3, 6) for layer in (0, 4)}
    init = run_dir / "probes" / "random_init" / "step_000000000"
    assert {row["checkpoint"] for row in rows if row["step"] == 0} == {str(init)}
    assert (init / "model.safetensors").is_file()

    tensorboard = EventAccumulator(str(run_dir / "tb"))
    tensorboard.Reload()
    assert [event.step for event in tensorboard.Scalars(f"probe/{TASK}/layer04/roc_auc")] == [0, 3, 6]
    report = (run_dir / "probes" / "report.md").read_text()
    assert "| step | layer | metric | score | seeds |" in report
    assert "| 0 (random init) | 4 | roc_auc |" in report
    assert "| 6 | 0 | roc_auc |" in report
    assert (run_dir / "probes" / "report.png").read_bytes().startswith(b"\x89PNG")

    assert main(["nightly", str(run_dir), *flags, "--layers", "0", "4", "--random-init"]) == 0
    assert read_results(run_dir) == rows  # nothing probed twice


def test_the_report_results_and_scalars_keep_the_protocols_apart(tmp_path):
    """One task probed under both protocols: two results, two report tables (each beside the published values),
    two TensorBoard tags."""
    run = tmp_path / "run"
    (run / "probes").mkdir(parents=True)
    rows = [
        {"step": 10, "task": "giantsteps_key", "metric": "weighted_score", "value": value, "primary": True,
         "seed": 0, "head": {"layer": 2}, **({"protocol": protocol} if protocol else {})}
        for protocol, value in ((None, 0.25), ("jukemir", 0.5))  # a row from before protocols were recorded
    ]  # fmt: skip
    (run / "probes" / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert sorted(row["value"] for row in read_results(run)) == [0.25, 0.5]
    report = write_report(run).read_text()
    marble, jukemir = report.split("## giantsteps_key@jukemir")
    assert "## giantsteps_key\n" in marble
    assert "0.2500" in marble
    assert "0.5000" in jukemir
    assert marble.count("0.501") == jukemir.count("0.501") == 1  # Music2Vec's published score in each table
    assert (
        scalar_tag("giantsteps_key", 2, "weighted_score", "jukemir")
        == "probe/giantsteps_key/jukemir/layer02/weighted_score"
    )
    assert scalar_tag("giantsteps_key", None, "weighted_score") == "probe/giantsteps_key/weighted_score"
