"""Resuming a run in another layout: another number of ranks, or of loader workers per rank.

Three things must carry over, and each has its own way:

- the global batch (crops per update = data.batch_size x train.grad_accum x ranks), on which the schedule and the
  EMA were tuned: `keep_global_batch` picks the train.grad_accum that keeps it at the new world size, and refuses
  when none does unless the user allows the batch to change;
- the weights and the optimizer state, sharded by ZeRO over the old ranks: DeepSpeed's universal checkpoint
  (`universal_checkpoint`) writes them per parameter, from which any number of ranks loads its own partitions;
- the data position: `StreamingLoader.continue_elastically` deals out what the old loader streams had not read of
  the epoch in progress, so that each of its clips is used once.

Resuming in the layout that wrote the checkpoint stays exact (same batches, same weights as an uninterrupted run);
an elastic resume is not bitwise: the same clips come in another order, and ZeRO sums gradients over other
partitions.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer import checkpoint, layout
from trainer.config import ExperimentConfig


@dataclass(frozen=True)
class Layout:
    """How a run is spread over processes: what exact resume needs unchanged, and what makes its global batch."""

    world_size: int
    workers: int  # data loader workers per rank
    batch_size: int  # crops per micro-batch on each rank
    grad_accum: int  # micro-batches per update

    @property
    def crops_per_update(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (
            f"{self.world_size} rank(s) x {self.workers} loader worker(s), {self.batch_size} crops x"
            f" {self.grad_accum} micro-batch(es) per rank = {self.crops_per_update} crops per update"
        )


def run_layout(cfg: ExperimentConfig, world_size: int) -> Layout:
    """The layout of `cfg` (data.workers resolved) on `world_size` ranks."""
    return Layout(world_size, cfg.data.workers, cfg.data.batch_size, cfg.train.grad_accum)


def checkpoint_layout(folder: Path) -> Layout:
    """The layout that wrote a complete checkpoint: its ranks from COMPLETE, the rest from its config.yaml."""
    return run_layout(checkpoint.saved_config(folder), checkpoint.read_marker(folder)["world_size"])


def newest_layout(run_dir: Path) -> tuple[int, Layout] | None:
    """The step and layout of the newest complete checkpoint that says what it was; None for a new run."""
    for step, folder in reversed(layout.complete_checkpoints(run_dir)):
        with contextlib.suppress(checkpoint.CheckpointError):
            return step, checkpoint_layout(folder)
    return None


def fit_to_newest_checkpoint(
    cfg: ExperimentConfig, run_dir: Path, world_size: int, *, allow_batch_change: bool
) -> tuple[ExperimentConfig, str | None, tuple[int, Layout] | None]:
    """`keep_global_batch` against the run directory's newest complete checkpoint: the fitted config, the change in
    words, and the checkpoint's step and layout (None for a new run). A refusal names the run directory."""
    newest = newest_layout(run_dir)
    if newest is None:
        return cfg, None, None
    try:
        fitted, change = keep_global_batch(cfg, world_size, newest[1], allow_batch_change=allow_batch_change)
    except ValueError as error:
        raise ValueError(f"{run_dir}: {error}") from None
    return fitted, change, newest


def keep_global_batch(
    cfg: ExperimentConfig, world_size: int, saved: Layout, *, allow_batch_change: bool
) -> tuple[ExperimentConfig, str | None]:
    """`cfg` with the train.grad_accum that keeps `saved`'s crops per update on `world_size` ranks, and what changed
    in words (None: nothing). A ValueError when no grad_accum keeps it, unless `allow_batch_change`: then the
    nearest one, or the config's own when the world size did not change."""
    now = run_layout(cfg, world_size)
    target, per_micro_batch = saved.crops_per_update, cfg.data.batch_size * world_size
    if now.crops_per_update == target:
        return cfg, None
    if world_size != saved.world_size and target % per_micro_batch == 0:
        kept = replace(cfg, train=replace(cfg.train, grad_accum=target // per_micro_batch))
        return kept, (
            f"train.grad_accum {cfg.train.grad_accum} -> {kept.train.grad_accum} keeps {target} crops per update"
            f" on {world_size} rank(s) (the checkpoint's {saved.world_size} ranks ran {saved.grad_accum})"
        )
    if not allow_batch_change:
        raise ValueError(batch_change_refusal(cfg, world_size, saved))
    grad_accum = cfg.train.grad_accum if world_size == saved.world_size else max(1, round(target / per_micro_batch))
    changed = replace(cfg, train=replace(cfg.train, grad_accum=grad_accum))
    crops = run_layout(changed, world_size).crops_per_update
    return (
        changed,
        f"the global batch changes from {target} to {crops} crops per update (train.grad_accum {grad_accum})",
    )


def batch_change_refusal(cfg: ExperimentConfig, world_size: int, saved: Layout) -> str:
    target = saved.crops_per_update
    candidates = range(1, 4 * max(world_size, saved.world_size) + 1)
    keeping = [str(ranks) for ranks in candidates if target % (cfg.data.batch_size * ranks) == 0]
    where = (
        f"Resume on a world size that keeps it ({', '.join(keeping)})"
        if keeping
        else f"No world size keeps it at data.batch_size={cfg.data.batch_size}"
    )
    return (
        f"its newest checkpoint trained {target} crops per update ({saved.describe()}); {world_size} rank(s) x"
        f" data.batch_size={cfg.data.batch_size} x train.grad_accum={cfg.train.grad_accum} would make"
        f" {cfg.data.batch_size * cfg.train.grad_accum * world_size}, and no train.grad_accum keeps {target} on"
        f" {world_size} rank(s). {where}, or pass --allow-batch-change to go on with another global batch"
    )


UNIVERSAL_LATEST = "latest_universal"  # what DeepSpeed's converter writes beside its output; nothing here reads it


def universal_folder(folder: Path) -> Path:
    """Where `universal_checkpoint` writes for the checkpoint at `folder`: beside it, hidden from the scans."""
    return folder.with_name(f".{folder.name}.universal")


def universal_checkpoint(folder: Path) -> Path:
    """DeepSpeed's universal form of a complete checkpoint, written by one process (rank 0) beside it; removed by
    the caller once every rank has loaded it (`remove_universal`). DeepSpeed's converter unpickles with
    weights_only=False: it runs under `weights_only_loading`, so nothing in the checkpoint can run code."""
    from deepspeed.checkpoint import ds_to_universal  # here: `launch` plans with this module on a login node

    from trainer.engine import weights_only_loading

    out = universal_folder(folder)
    shutil.rmtree(out, ignore_errors=True)  # left by a resume that was killed while converting
    args = Namespace(
        input_folder=str(folder),
        output_folder=str(out),
        num_extract_workers=1,  # in this process: worker processes would not inherit the weights-only allow-list
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # checkpoints written before they carried the mark the converter looks for
    )
    chatter = io.StringIO()
    try:
        with weights_only_loading(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as error:  # noqa: BLE001 - the converter asserts, raises KeyError, ValueError ...
        shutil.rmtree(out, ignore_errors=True)
        if "Weights only load failed" in str(error):
            raise checkpoint.unreadable(folder, error) from None
        raise checkpoint.CheckpointError(
            f"{folder}: DeepSpeed could not convert it for another world size ({error}); resume with the world"
            f" size that wrote it. Converter output: {chatter.getvalue()[-2000:]}"
        ) from None
    return out


def remove_universal(folder: Path) -> None:
    shutil.rmtree(universal_folder(folder), ignore_errors=True)
    (folder.parent / UNIVERSAL_LATEST).unlink(missing_ok=True)


def rng_state_for(rank: int, states: list[dict[str, Any]]) -> dict[str, Any]:
    """The RNG state a new rank continues with, from the old ranks' (by rank). The CPU generators are the same on
    every rank (LayerDrop must skip the same layers everywhere): rank 0's. A GPU's generator differs per rank: an
    old rank's own, and a new rank keeps the one it was seeded with at start, which no old rank used."""
    state = {name: value for name, value in states[0].items() if name != "cuda"}
    if rank < len(states) and "cuda" in states[rank]:
        state["cuda"] = states[rank]["cuda"]
    return state
