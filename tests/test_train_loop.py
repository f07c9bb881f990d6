"""`trainer.train` in this process: one gloo rank, the tiny model, a handful of updates, checkpoints, and a resume
that continues exactly. Seconds, so most trainer changes are checked by `make test-fast`; test_train.py runs the
`music2vec train` command itself: several ranks, launchers, signals, kills."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import assert_same_teacher_that_moved

from trainer.config import load_config
from trainer.layout import checkpoint_folder, complete_checkpoints, export_folder
from trainer.metrics import read_metrics
from trainer.stop import StopFlag
from trainer.train import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_rank")


def config(shards, run_dir, *extra):
    overrides = [
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        "optim.max_updates=4",
        "train.checkpoint_every=2",
        "train.log_every=1",
        *extra,
    ]
    return load_config(TINY, overrides)


def test_a_resumed_run_takes_exactly_the_steps_of_an_uninterrupted_one(demo_shards, tmp_path):
    cfg = config(demo_shards, tmp_path)
    summary = train(cfg)
    assert (summary.start_step, summary.end_step, summary.stopped_by) == (0, 4, None)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 4]
    straight = [entry["loss"] for entry in read_metrics(tmp_path)]
    assert len(straight) == 4
    weights = load_file(export_folder(tmp_path, 4) / "model.safetensors")

    # as if the run had died just before its last checkpoint
    shutil.rmtree(checkpoint_folder(tmp_path, 4))
    shutil.rmtree(export_folder(tmp_path, 4))
    summary = train(cfg)
    assert (summary.start_step, summary.end_step) == (2, 4)
    assert [entry["loss"] for entry in read_metrics(tmp_path)] == straight
    resumed = load_file(export_folder(tmp_path, 4) / "model.safetensors")
    assert resumed.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_requested_stop_checkpoints_at_the_next_update(demo_shards, tmp_path):
    """What a launcher does when the scheduler's warning signal comes: the run stops after one update, with a
    checkpoint of it, and the next start finishes the run from there."""
    stop = StopFlag()
    stop.request("the test asked")
    summary = train(config(demo_shards, tmp_path), stop=stop)
    assert (summary.end_step, summary.stopped_by) == (1, "the test asked")
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [1]
    summary = train(config(demo_shards, tmp_path))
    assert (summary.start_step, summary.end_step, summary.stopped_by) == (1, 4, None)
    assert [entry["step"] for entry in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_zero3s_teacher_is_zero2s(demo_shards, tmp_path):
    """One rank under ZeRO-3 (the teacher gathers the student's weights for its update) and under ZeRO-2: the same
    teacher. test_train.py does the same with the weights partitioned over two ranks."""
    teachers = {}
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        train(
            config(
                demo_shards, run_dir, "optim.max_updates=8", "train.checkpoint_every=8", f"train.zero_stage={stage}"
            )
        )
        teachers[stage] = load_file(checkpoint_folder(run_dir, 8) / "teacher.safetensors")
    assert_same_teacher_that_moved(teachers[2], teachers[3])
