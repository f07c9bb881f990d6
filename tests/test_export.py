"""`music2vec export`: fp32 weights from complete checkpoints of ZeRO 2 and 3, one rank or two, as folders that
transformers loads; the student's and the teacher's; incomplete, occupied and planted inputs refused."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import plant
from transformers import Data2VecAudioModel

from model.hf import to_hf_state_dict
from trainer.checkpoint import CheckpointError
from trainer.cli import main
from trainer.config import load_config
from trainer.export import export
from trainer.layout import COMPLETE, checkpoint_folder, complete_checkpoints, export_folder, step_of
from trainer.train import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
UPDATES = 2


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


def hf_teacher(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The teacher's transformer under Hugging Face names."""
    teacher = load_file(checkpoint / "teacher.safetensors")
    return to_hf_state_dict({f"transformer.{name}": tensor for name, tensor in teacher.items()})


def assert_loads_in_transformers(folder: Path) -> None:
    model, info = Data2VecAudioModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


@pytest.fixture(scope="module")
def one_rank_runs(one_rank, demo_shards, tmp_path_factory) -> dict[str, Path]:  # noqa: ARG001 - trains in it
    """Run directories of the tiny model after two updates on one rank: ZeRO-2 in fp32, ZeRO-3 in bf16."""
    runs = {}
    for name, extra in {
        "zero2_fp32": ["train.zero_stage=2"],
        "zero3_bf16": ["train.zero_stage=3", "train.precision=bf16"],
    }.items():
        run_dir = tmp_path_factory.mktemp(name)
        every_update = ["train.checkpoint_every=1", f"optim.max_updates={UPDATES}"]
        train(load_config(TINY, [f"data.shards={demo_shards}", f"train.run_dir={run_dir}", *every_update, *extra]))
        runs[name] = run_dir
    return runs


def test_an_fp32_runs_student_export_is_the_training_export(one_rank_runs, tmp_path):
    run_dir = one_rank_runs["zero2_fp32"]
    assert main(["export", str(checkpoint_folder(run_dir, UPDATES)), "--out", str(tmp_path / "student")]) == 0
    assert_same(weights(tmp_path / "student"), weights(export_folder(run_dir, UPDATES)))
    assert_loads_in_transformers(tmp_path / "student")


def test_a_bf16_runs_student_export_holds_the_fp32_master_weights(one_rank_runs, tmp_path):
    """The training export holds the bf16 weights the forward used; the export, the fp32 weights they round from,
    merged from ZeRO-3's partitions."""
    run_dir = one_rank_runs["zero3_bf16"]
    export(run_dir, tmp_path / "student")  # a run directory stands for its newest complete checkpoint
    masters, used = weights(tmp_path / "student"), weights(export_folder(run_dir, UPDATES))
    assert masters.keys() == used.keys()
    for name, tensor in masters.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor.bfloat16().float(), used[name]), name
    assert any(not torch.equal(tensor, used[name]) for name, tensor in masters.items())


def test_the_teacher_export_is_the_ema_transformer_behind_the_students_cnn(one_rank_runs, tmp_path):
    folder = checkpoint_folder(one_rank_runs["zero3_bf16"], UPDATES)
    export(folder, tmp_path / "student")
    export(folder, tmp_path / "teacher", weights="teacher")
    exported, student, teacher = weights(tmp_path / "teacher"), weights(tmp_path / "student"), hf_teacher(folder)
    assert exported.keys() == student.keys()
    for name, tensor in exported.items():
        expected = teacher.get(name, student[name])  # the transformer's weights are the teacher's, the rest shared
        assert torch.equal(tensor, expected), name
    moved = [name for name in teacher if not torch.equal(teacher[name], student[name])]
    assert moved, "the teacher lags the student: some of its weights differ"
    assert_loads_in_transformers(tmp_path / "teacher")


def test_an_incomplete_checkpoint_and_an_occupied_folder_are_refused_by_name(one_rank_runs, tmp_path, capsys):
    source = one_rank_runs["zero2_fp32"]
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    interrupted = checkpoint_folder(run_dir, UPDATES)
    (interrupted / COMPLETE).unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(interrupted), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"{interrupted}: incomplete" in error
    assert "export a complete one: step_000000001" in error
    assert not (tmp_path / "out").exists()

    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken: already exists"):
        export(run_dir, tmp_path / "taken")


def test_a_planted_pickle_is_refused_and_never_runs(one_rank_runs, tmp_path):
    """DeepSpeed's consolidation asks torch to unpickle anything; the export loads weights only all the same."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_rank_runs["zero2_fp32"], run_dir)
    evidence = tmp_path / "the-pickle-ran"
    planted = plant(run_dir, checkpoint_folder(run_dir, UPDATES), evidence)
    with pytest.raises(CheckpointError, match="refused: it holds pickled objects that could run code"):
        export(planted.parent, tmp_path / "out")
    assert not evidence.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_partitions_are_merged(two_rank_runs, stage, tmp_path):
    """The fp32 weights of a run whose ZeRO partitions were spread over two ranks, student and teacher."""
    run_dir = two_rank_runs[stage]
    folder = complete_checkpoints(run_dir)[-1][1]
    assert len(list(folder.glob("*optim_states.pt"))) == 2
    export(folder, tmp_path / "student")
    export(folder, tmp_path / "teacher", weights="teacher")
    student = weights(export_folder(run_dir, step_of(folder)))
    assert_same(weights(tmp_path / "student"), student)
    assert_same(weights(tmp_path / "teacher"), student | hf_teacher(folder))
    assert_loads_in_transformers(tmp_path / "teacher")
