"""Elastic resume with the trainer: checkpoints of two ranks continued on one and of one on two, with the loader's
workers changing too; weights, Adam's moments and the teacher carried over; the global batch kept or the resume
refused; the plan shown by `launch --dry-run`. (Which clips the loader continues with: tests/test_loader.py.)"""

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from test_reliability import plant
from test_train import command, run, torchrun

from data import StreamingLoader
from data.audio import SAMPLE_RATE
from model import Music2Vec
from trainer import checkpoint, elastic
from trainer.cli import main
from trainer.config import load_config
from trainer.engine import Engine, weights_only_loading
from trainer.export import consolidated_student
from trainer.layout import checkpoint_folder, complete_checkpoints
from trainer.metrics import read_metrics
from trainer.train import load_checkpoint, train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def copy_run(source: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir


def flat_states(folder: Path, name: str) -> list[torch.Tensor]:
    """Each rank's flat fp32 partition of the Adam state `name`, read from its optimizer file (rank order)."""
    states = []
    with weights_only_loading():
        for path in sorted(folder.glob("*_optim_states.pt")):
            optimizer = torch.load(path, weights_only=True)["optimizer_state_dict"]
            base = optimizer.get("base_optimizer_state") or optimizer["optimizer_state_dict"]
            states.append(base["state"][0][name])
    return states


def param_shapes(folder: Path) -> dict[str, torch.Size]:
    path = next(iter(sorted(folder.glob("*model_states.pt"))))
    with weights_only_loading():
        return torch.load(path, weights_only=True)["param_shapes"][0]


def merged(flats: list[torch.Tensor], shapes: dict[str, torch.Size], *, stage: int) -> dict[str, torch.Tensor]:
    """Whole tensors from the ranks' flat partitions, as ZeRO lays them out: stage 2 cuts one flat vector into
    consecutive rank partitions; stage 3 cuts each parameter into equal per-rank pieces (the last one padded)."""
    whole, offset = {}, 0
    if stage == 2:
        vector = torch.cat(flats)
        for name, shape in shapes.items():
            whole[name] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return whole
    for name, shape in shapes.items():
        piece = math.ceil(shape.numel() / len(flats))
        pieces = torch.cat([flat[offset : offset + piece] for flat in flats])
        whole[name] = pieces[: shape.numel()].view(shape)
        offset += piece
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_checkpoint_loads_on_one_with_weights_moments_and_teacher(
    one_rank,  # noqa: ARG001 - loads in it
    two_rank_runs,
    stage,
    tmp_path,
):
    """ZeRO partitions of two ranks, loaded into one rank through DeepSpeed's universal checkpoint: the fp32
    masters equal DeepSpeed's own consolidation of them, Adam's moments and step equal the two ranks' pieces put
    together, the teacher is the checkpoint's; the loader continues with what the old streams had left."""
    run_dir = copy_run(two_rank_runs[stage], tmp_path)
    folder = checkpoint_folder(run_dir, 8)
    saved = elastic.checkpoint_layout(folder)
    assert saved.world_size == 2
    cfg, change = elastic.keep_global_batch(checkpoint.saved_config(folder), 1, saved, allow_batch_change=False)
    assert cfg.train.grad_accum == 2 * saved.grad_accum, change
    model = Music2Vec(cfg.model)
    engine = Engine(model, cfg, 1)
    frames = cfg.model.num_frames(round(cfg.data.crop_seconds * SAMPLE_RATE))
    loader = StreamingLoader(replace(cfg.data, workers=2), frames=frames, rank=0, world_size=1)
    now = elastic.Layout(1, 2, cfg.data.batch_size, cfg.train.grad_accum)

    problem, said = load_checkpoint(folder, engine, loader, rank=0, now=now)

    assert problem is None
    assert "elastic resume from 2 rank(s)" in said
    assert "weights and optimizer state resharded" in said
    masters = consolidated_student(folder)
    shapes = param_shapes(folder)
    moments = {name: merged(flat_states(folder, name), shapes, stage=stage) for name in ("exp_avg", "exp_avg_sq")}
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(parameter), masters[name]), name
        for moment, expected in moments.items():
            assert torch.equal(safe_get_full_optimizer_state(parameter, moment), expected[name]), (moment, name)
    steps = {float(step) for step in flat_states(folder, "step")}
    assert steps == {8.0}
    assert {float(s["step"]) for s in engine.ds.optimizer.optimizer.state.values()} == steps
    teacher = checkpoint.load_teacher(folder)
    assert all(torch.equal(tensor, teacher[name]) for name, tensor in model.teacher.state_dict().items())
    state = loader.state_dict()
    assert set(state["streams"]) == {0, 1}
    assert not list(run_dir.glob("checkpoints/.*universal*"))
    assert not (run_dir / "checkpoints" / elastic.UNIVERSAL_LATEST).exists()


@pytest.mark.slow
def test_training_continues_on_one_rank_with_the_global_batch_kept(
    one_rank,  # noqa: ARG001 - trains in it
    two_rank_runs,
    demo_shards,
    tmp_path,
    capsys,
):
    """Two ranks' run continued on one with two loader workers; a planted checkpoint ahead of it, whose optimizer
    file would run a command when unpickled, is refused by the conversion and passed over."""
    run_dir = copy_run(two_rank_runs[2], tmp_path)
    before = read_metrics(run_dir)
    evidence = tmp_path / "code-ran"
    plant(run_dir, checkpoint_folder(run_dir, 8), evidence)
    cfg = load_config(TINY, [f"data.shards={demo_shards}", f"train.run_dir={run_dir}"])
    cfg = replace(cfg, optim=replace(cfg.optim, max_updates=12), data=replace(cfg.data, workers=2))

    summary = train(cfg, allow_config_change=True)  # more updates than the run was configured for

    captured = capsys.readouterr()
    said = captured.out
    assert not evidence.exists()
    assert (
        "refused: it holds pickled objects that could run code when loaded (the first: posix.system)" in captured.err
    )
    assert "train.grad_accum 1 -> 2 keeps 8 crops per update on 1 rank(s)" in said
    assert "resuming" in said
    assert "from step_000000008 (config digest changed); elastic resume from 2 rank(s) x 1 loader worker(s)" in said
    assert (summary.start_step, summary.end_step) == (8, 12)
    metrics = read_metrics(run_dir)
    assert [entry["step"] for entry in metrics] == list(range(1, 13))
    first, last_before, resumed = before[0]["loss"], before[-1]["loss"], metrics[8]["loss"]
    assert math.isfinite(resumed)
    assert resumed < (first + last_before) / 2, "the resumed student starts from the trained weights, not afresh"
    marker = checkpoint.read_marker(checkpoint_folder(run_dir, 12))
    assert marker["world_size"] == 1
    assert checkpoint.saved_config(checkpoint_folder(run_dir, 12)).train.grad_accum == 2
    assert [step for step, _ in complete_checkpoints(run_dir)] == [8, 12, 999_999_999]  # the planted one stays
    assert not list(run_dir.glob("checkpoints/.*universal*"))


@pytest.mark.slow
def test_one_rank_continues_on_two_and_a_batch_it_cannot_keep_is_refused(
    one_rank,  # noqa: ARG001 - trains in it
    demo_shards,
    tmp_path,
):
    """One rank with 2 micro-batches per update continues on two ranks with one each (and two loader workers).
    One micro-batch per update on one rank cannot be kept on two: refused."""
    run_dir = tmp_path / "one"
    overrides = [f"data.shards={demo_shards}", f"train.run_dir={run_dir}", "train.checkpoint_every=4"]
    train(load_config(TINY, [*overrides, "optim.max_updates=4", "train.grad_accum=2"]))

    same_config = ["train.grad_accum=2", "--allow-config-change"]  # the config as it was, but for the updates
    two = torchrun(2, command(demo_shards, run_dir, "optim.max_updates=8", "data.workers=2", *same_config))
    result = run(two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train.grad_accum 2 -> 1 keeps 8 crops per update on 2 rank(s)" in result.stdout
    assert "elastic resume from 1 rank(s) x 1 loader worker(s)" in result.stdout
    losses = [entry["loss"] for entry in read_metrics(run_dir)]
    assert len(losses) == 8
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[4] < (losses[0] + losses[3]) / 2, "the two ranks start from the trained weights, not afresh"
    assert checkpoint.read_marker(checkpoint_folder(run_dir, 8))["world_size"] == 2

    single = tmp_path / "single"
    train(load_config(TINY, [f"data.shards={demo_shards}", f"train.run_dir={single}", "optim.max_updates=2"]))
    refused = run(torchrun(2, command(demo_shards, single, "optim.max_updates=4", "--allow-config-change")))
    assert refused.returncode != 0
    assert "no train.grad_accum keeps 4 on 2 rank(s)" in refused.stderr
    assert "Resume on a world size that keeps it (1)" in refused.stderr
    assert len(complete_checkpoints(single)) == 1  # nothing was trained; with --allow-batch-change: see below


def test_keep_global_batch_picks_grad_accum_or_refuses_with_the_world_sizes_that_keep_it():
    cfg = load_config(TINY, ["train.grad_accum=1"])  # 4 crops per micro-batch
    saved = elastic.Layout(world_size=8, workers=4, batch_size=4, grad_accum=1)  # 32 crops per update
    fitted, change = elastic.keep_global_batch(cfg, 4, saved, allow_batch_change=False)
    assert fitted.train.grad_accum == 2
    assert "train.grad_accum 1 -> 2 keeps 32 crops per update on 4 rank(s)" in change
    same, change = elastic.keep_global_batch(cfg, 8, saved, allow_batch_change=False)
    assert same is cfg
    assert change is None
    with pytest.raises(ValueError, match=r"Resume on a world size that keeps it \(1, 2, 4, 8\)") as refused:
        elastic.keep_global_batch(cfg, 3, saved, allow_batch_change=False)
    assert "--allow-batch-change" in str(refused.value)
    nearest, change = elastic.keep_global_batch(cfg, 3, saved, allow_batch_change=True)
    assert nearest.train.grad_accum == 3  # 36 crops: the nearest to 32 on 3 ranks
    assert "from 32 to 36 crops per update" in change
    bigger = load_config(TINY, ["train.grad_accum=2"])
    with pytest.raises(ValueError, match=r"no train\.grad_accum keeps 32"):  # asked for 64 on the same world size
        elastic.keep_global_batch(bigger, 8, saved, allow_batch_change=False)
    kept, change = elastic.keep_global_batch(bigger, 8, saved, allow_batch_change=True)
    assert kept.train.grad_accum == 2
    assert "from 32 to 64" in change


def test_launch_dry_run_shows_the_elastic_plan(demo_shards, tmp_path, capsys):
    """A run directory checkpointed by 2 ranks, launched on 4: the plan shows grad_accum and what is resharded."""
    run_dir = tmp_path / "run"
    folder = checkpoint_folder(run_dir, 6)
    folder.mkdir(parents=True)
    cfg_overrides = [f"data.shards={demo_shards}", f"train.run_dir={run_dir}"]
    cfg = load_config(TINY, [*cfg_overrides, "train.grad_accum=2"])
    checkpoint.save_config_copy(folder, replace(cfg, data=replace(cfg.data, workers=1)))
    checkpoint.write_marker(folder, checkpoint.marker_content(6, cfg.digest(), 2, checkpoint.file_digests(folder)))
    args = ["launch", str(TINY), *cfg_overrides, "train.grad_accum=2", "--gpus-per-node", "0"]
    main([*args, "--tasks-per-node", "4", "--cpus-per-task", "1", "--dry-run"])
    report = capsys.readouterr().out
    assert "resume: elastic, from step 6: written by 2 rank(s) x 1 loader worker(s)" in report
    assert "this job: 4 rank(s) x 1 loader worker(s), 4 crops x 1 micro-batch(es) per rank = 16 crops" in report
    assert "train.grad_accum 2 -> 1 keeps 16 crops per update on 4 rank(s)" in report
    assert "resharded through DeepSpeed's universal checkpoint" in report
    assert "grad_accum: 1" in report  # the resolved config the job gets
    with pytest.raises(SystemExit) as refused:
        main([*args, "--tasks-per-node", "3", "--cpus-per-task", "1", "--dry-run"])
    assert refused.value.code != 0
    assert "no train.grad_accum keeps 16 on 3 rank(s)" in capsys.readouterr().err
    main([*args, "--tasks-per-node", "2", "--cpus-per-task", "1", "--dry-run"])
    assert "resume: exact, from step 6" in capsys.readouterr().out
