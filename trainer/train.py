"""The training loop: DeepSpeed trains the student, the EMA teacher follows once per optimizer update.

The same call starts a run or resumes it: the run directory decides. Resume is exact: a run killed after a
checkpoint and started again takes the same batches, draws the same dropout, and reaches the same weights as one
that was never interrupted (same config, world size and data workers). On another world size or number of data
workers the resume is elastic (trainer.elastic): the global batch, the weights, the optimizer state and the epoch's
clips carry over; the order of the clips and the summation order of the gradients do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from data.audio import SAMPLE_RATE
from data.loader import StreamingLoader
from model import Music2Vec, save_hf
from trainer import checkpoint, elastic, layout, rundir
from trainer.collectives import agree_on_failure, reduce_scalar
from trainer.config import ExperimentConfig, check_run_dir, save_config
from trainer.engine import Engine
from trainer.metrics import MetricsLog
from trainer.schedule import tri_stage_lr
from trainer.stop import StopFlag
from trainer.toolchain import check_toolchain


class TrainingAbortedError(RuntimeError):
    """The run cannot go on (diverged, collapsed, a checkpoint could not be written); its last complete checkpoint
    is intact."""


class RunDirOwner(Protocol):
    """What makes a run the only one writing into its directory (cluster.lease.Lease); rank 0 holds it."""

    def claim(self, run_dir: Path) -> str | None:
        """Hold `run_dir`, or raise a ValueError naming who does; what was taken over from whom, if anything."""

    def lost(self) -> str | None:
        """Why this run no longer holds its directory, or None while it does."""


@dataclass
class TrainSummary:
    run_dir: Path
    start_step: int
    end_step: int
    first_loss: float | None
    last_loss: float | None
    audio_seconds_per_s: float
    stopped_by: str | None  # the signal or request that ended the run early, if any
    device: str  # what rank 0 trained on, e.g. "cuda:0 (NVIDIA H200)" or "cpu"


def check_runnable(cfg: ExperimentConfig) -> None:
    """What the config asks of this machine, checked before any process group or model exists."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32 here")
    check_toolchain(cfg, on_gpu=torch.cuda.is_available())


def use_deterministic_kernels() -> None:
    """Deterministic GPU kernels, so that a resumed GPU run equals an uninterrupted one bitwise. Costs speed:
    PERFORMANCE.md has the measurement. Nothing changes on a CPU: its kernels already are deterministic here, and
    torch's deterministic mode would only swap in slower CPU ones (4x on the tiny model)."""
    if not torch.cuda.is_available():
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS reduces in a fixed order; read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def train(
    cfg: ExperimentConfig,
    *,
    allow_config_change: bool = False,
    allow_batch_change: bool = False,
    stop: StopFlag | None = None,
    owner: RunDirOwner | None = None,
) -> TrainSummary:
    """Train (or resume) the run of `cfg` on every rank of the process group. `owner`: the lease rank 0 claims
    before it writes anything, and checks before every checkpoint. `allow_batch_change`: resume on a world size
    where no train.grad_accum keeps the checkpoint's global batch, with the nearest one."""
    check_runnable(cfg)
    cfg = replace(cfg, data=cfg.data.sized_for(cpus_per_rank()))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.train.run_dir)
    cfg = fit_to_checkpoint(cfg, run_dir, world_size, rank=rank, allow_batch_change=allow_batch_change)
    prepare_run_dir(cfg, run_dir, rank=rank, allow_config_change=allow_config_change, owner=owner)
    seed_everything(cfg.train.seed, rank, deterministic=cfg.train.deterministic)
    model = Music2Vec(cfg.model)
    engine = Engine(model, cfg, world_size)
    frames = cfg.model.num_frames(round(cfg.data.crop_seconds * SAMPLE_RATE))
    loader = StreamingLoader(cfg.data, frames=frames, rank=rank, world_size=world_size)
    start = updates = resume(
        run_dir,
        engine,
        loader,
        rank=rank,
        now=elastic.run_layout(cfg, world_size),
        config_digest=None if allow_config_change else cfg.digest(),  # None: any checkpoint of this run will do
        allow_batch_change=allow_batch_change,
    )
    write_ds_config(run_dir, engine, rank=rank)
    log = MetricsLog(
        run_dir, rank=rank, every=cfg.train.log_every, start=updates, total=cfg.optim.max_updates, memory=engine.memory
    )
    (stop := stop or StopFlag()).install()

    losses, update, nonfinite = [], UpdateStats(), NonFiniteGuard(cfg.train.max_nonfinite)
    # Closed on the way out, on an error too: the DataLoader workers ignore stop signals (the trainer answers them),
    # so only an orderly shutdown ends them, and a process whose workers live on never exits.
    with contextlib.closing(iter(loader)) as batches:
        while updates < cfg.optim.max_updates:
            # 1) the next micro-batch, timing how long the loader kept us waiting
            batch = update.wait_for(batches)
            engine.set_lr(lr_at(cfg, updates))
            loss, metrics = engine.forward(batch.audio, batch.mask)

            # 2) a non-finite loss on any rank skips this micro-batch everywhere; too many in a row abort the run
            if nonfinite.should_skip(loss, updates=updates):
                continue

            # 3) backward and step; DeepSpeed accumulates until the update boundary
            engine.backward(loss)
            boundary = engine.at_update_boundary()
            applied = engine.step()
            update.add_micro_batch(loss, metrics, crops=batch.audio.shape[0], crop_seconds=cfg.data.crop_seconds)
            if not boundary:
                continue
            if not applied:  # fp16 overflow: DeepSpeed skipped the update and lowered the loss scale
                update.reset()
                continue

            # 4) the update happened: the teacher follows, once per update, never per micro-batch
            updates += 1
            with engine.gathered(model.encoder.transformer):
                decay = model.update_teacher(updates)
            values = update.finish(world_size) | {
                "lr": lr_at(cfg, updates - 1),
                "ema_decay": decay,
                "nonfinite_skipped": float(nonfinite.skipped),
            }
            values |= _optional(grad_norm=engine.grad_norm(), loss_scale=engine.loss_scale())
            values |= {f"loader_skipped_{reason}": count for reason, count in loader.skipped().items()}
            losses.append(values["loss"])
            log.update(updates, values)
            # Judged on the mean over ranks: one rank aborting alone would leave the others waiting in a collective.
            check_collapse(cfg, updates, reduce_scalar(values["target_var"], dist.ReduceOp.SUM) / world_size)

            # 5) checkpoint on schedule, at the end, or when asked to stop
            stopping = stop.should_stop()
            if stopping or updates % cfg.train.checkpoint_every == 0 or updates == cfg.optim.max_updates:
                save_checkpoint(cfg, run_dir, engine, loader, updates, rank=rank, world_size=world_size, owner=owner)
            if stopping:
                break

    log.close(updates)
    stopped_by = stop.reason if updates < cfg.optim.max_updates else None  # a finished run was not stopped
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    return TrainSummary(
        run_dir, start, updates, first, last, update.overall_rate(world_size), stopped_by, device_label(engine.device)
    )


def device_label(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def lr_at(cfg: ExperimentConfig, updates_done: int) -> float:
    o = cfg.optim
    return tri_stage_lr(
        updates_done,
        peak=o.lr,
        max_updates=o.max_updates,
        phase_ratio=o.phase_ratio,
        init_scale=o.init_lr_scale,
        final_scale=o.final_lr_scale,
    )


class NonFiniteGuard:
    """Skips a micro-batch whose loss is not finite on any rank, on every rank (one rank skipping alone would leave
    the others waiting in the gradient all-reduce), and aborts the run after `limit` such micro-batches in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped = 0
        self.in_a_row = 0

    def should_skip(self, loss: torch.Tensor, *, updates: int) -> bool:
        if reduce_scalar(float(not torch.isfinite(loss).item())) == 0:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TrainingAbortedError(
                f"{self.in_a_row} non-finite losses in a row at update {updates}: the run diverged;"
                " its last complete checkpoint is intact; lower optim.lr or use bf16 instead of fp16"
            )
        return True


class UpdateStats:
    """Timing and loss statistics of the micro-batches that make up one optimizer update."""

    def __init__(self) -> None:
        self._total_audio = 0.0
        self._total_time = 0.0
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.waited = 0.0
        self.sums: dict[str, float] = {}
        self.micro_batches = 0
        self.crops = 0
        self.audio_seconds = 0.0

    def wait_for(self, batches: Any) -> Any:
        waiting = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - waiting
        return batch

    def add_micro_batch(
        self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], crops: int, crop_seconds: float
    ) -> None:
        named = {"loss": loss, **metrics}
        numbers = torch.stack([value.detach().float() for value in named.values()]).tolist()  # one device sync
        for name, number in zip(named, numbers, strict=True):
            self.sums[name] = self.sums.get(name, 0.0) + number
        self.micro_batches += 1
        self.crops += crops
        self.audio_seconds += crops * crop_seconds

    def finish(self, world_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        values = {name: total / self.micro_batches for name, total in self.sums.items()}
        values.pop("masked_frames", None)
        values |= {
            "step_time": elapsed,
            "data_wait_fraction": self.waited / elapsed,
            "samples_per_s": self.crops * world_size / elapsed,
            "audio_seconds_per_s": self.audio_seconds * world_size / elapsed,
        }
        self._total_audio += self.audio_seconds
        self._total_time += elapsed
        self.reset()
        return values

    def overall_rate(self, world_size: int) -> float:
        return self._total_audio * world_size / self._total_time if self._total_time else 0.0


def _optional(**values: float | None) -> dict[str, float]:
    return {name: value for name, value in values.items() if value is not None}


def check_collapse(cfg: ExperimentConfig, updates: int, target_var: float) -> None:
    """Targets whose spread vanishes mean the teacher collapsed (docs/ALGORITHM.md §5): training on wastes compute."""
    if updates > cfg.train.collapse_check_after and target_var < cfg.train.min_target_var:
        raise TrainingAbortedError(
            f"target_var={target_var:.4f} < train.min_target_var={cfg.train.min_target_var} at update {updates}:"
            " the teacher's targets collapsed; the last complete checkpoint is intact; lower optim.lr and restart"
        )


def seed_everything(seed: int, rank: int, *, deterministic: bool = False) -> None:
    """The same CPU seed on every rank: LayerDrop draws from it and all ranks must skip the same layers.
    `deterministic`: deterministic GPU kernels too (`use_deterministic_kernels`)."""
    if deterministic:
        use_deterministic_kernels()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed + rank)  # dropout on GPUs differs across ranks, as with fairseq's seeds


def cpus_per_rank() -> int:
    """The CPUs this process may use, shared with the other ranks on its machine (LOCAL_WORLD_SIZE says how many)."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fit_to_checkpoint(
    cfg: ExperimentConfig, run_dir: Path, world_size: int, *, rank: int, allow_batch_change: bool
) -> ExperimentConfig:
    """`cfg` with the train.grad_accum that keeps the newest checkpoint's global batch on this world size (see
    `elastic.keep_global_batch`); rank 0 says what changed."""
    fitted, change, _ = elastic.fit_to_newest_checkpoint(
        cfg, run_dir, world_size, allow_batch_change=allow_batch_change
    )
    if change and rank == 0:
        print(f"{run_dir}: {change}", flush=True)
    return fitted


def prepare_run_dir(
    cfg: ExperimentConfig, run_dir: Path, *, rank: int, allow_config_change: bool, owner: RunDirOwner | None
) -> None:
    """Create the run directory (writable by this user only, or its group), claim it, and write config.yaml on a
    new run; refuse a run directory that others can write into, that another run holds, or that ran another config
    unless allowed."""
    shared_group = cfg.train.shared_group
    rundir.set_umask(shared_group=shared_group)

    def open_and_claim() -> None:  # rank 0
        rundir.open_run_dir(run_dir, shared_group=shared_group)
        taken_over = owner.claim(run_dir) if owner else None
        if taken_over:
            print(taken_over, file=sys.stderr, flush=True)

    refused = agree_on_failure(open_and_claim if rank == 0 else None)
    if refused:
        raise ValueError(refused)
    check_run_dir(cfg, run_dir, allow_config_change=allow_config_change)
    checkpoint.barrier()  # every rank has read the old config before rank 0 replaces it
    if rank == 0:
        save_config(cfg, run_dir / layout.CONFIG)
    checkpoint.barrier()


def write_ds_config(run_dir: Path, engine: Engine, *, rank: int) -> None:
    """The DeepSpeed config this run uses, filled in from the template, for the record (rank 0)."""
    if rank == 0:
        (run_dir / layout.DS_CONFIG).write_text(json.dumps(engine.config, indent=2) + "\n")


def check_owner(owner: RunDirOwner | None, *, rank: int) -> None:
    """Before a checkpoint: stop, writing nothing, if another run took the run directory over (every rank)."""

    def still_held() -> None:
        lost = owner.lost() if owner else None
        if lost:
            raise ValueError(lost)

    lost = agree_on_failure(still_held if rank == 0 else None)
    if lost:
        raise TrainingAbortedError(f"{lost}; no checkpoint was written")


def resume(
    run_dir: Path,
    engine: Engine,
    loader: StreamingLoader,
    *,
    rank: int,
    now: elastic.Layout,
    config_digest: str | None,
    allow_batch_change: bool = False,
) -> int:
    """Load the newest complete checkpoint that verifies and loads; the number of updates it had done (0 for a new
    run). A damaged one is reported and left in place, and the one before it is used. `now`: this run's layout; a
    checkpoint written in another one is resumed elastically. `config_digest`: None when a config change was
    allowed."""
    unusable = []
    for step, folder in reversed(layout.complete_checkpoints(run_dir)):
        check = partial(
            check_resumable, folder, now, config_digest=config_digest, allow_batch_change=allow_batch_change
        )
        problem = agree_on_failure(check if rank == 0 else None)  # rank 0 reads every file
        if problem is None:
            problem, said = load_checkpoint(folder, engine, loader, rank=rank, now=now)
        if problem is None:
            if rank == 0:
                print(f"resuming {run_dir} from {folder.name} (config digest {config_digest or 'changed'}){said}")
            return step
        unusable.append(problem)
        if rank == 0:
            print(f"cannot resume from {folder}: {problem}; it stays as it is; trying the one before", file=sys.stderr)
    if unusable:
        raise checkpoint.CheckpointError(
            f"none of the {len(unusable)} complete checkpoints in {run_dir / 'checkpoints'} can be resumed from, so"
            " nothing was started (starting afresh would overwrite the run): restore the damaged files, or move"
            " the run directory aside to start again. The newest one: " + unusable[0]
        )
    return 0


def check_resumable(folder: Path, now: elastic.Layout, *, config_digest: str | None, allow_batch_change: bool) -> None:
    """Every file as COMPLETE says, the same config, and the same global batch as this run (unless allowed)."""
    checkpoint.verify(folder, config_digest=config_digest)
    saved = elastic.checkpoint_layout(folder)
    if saved.crops_per_update != now.crops_per_update and not allow_batch_change:
        raise checkpoint.CheckpointError(
            f"{folder}: it trained {saved.crops_per_update} crops per update ({saved.describe()}), this run"
            f" {now.crops_per_update} ({now.describe()}); pass --allow-batch-change to go on with another global batch"
        )


def load_checkpoint(
    folder: Path, engine: Engine, loader: StreamingLoader, *, rank: int, now: elastic.Layout
) -> tuple[str | None, str]:
    """Load `folder` on every rank: (the problem that stopped it, None when loaded; what the resume did, in words).
    In the layout that wrote it the resume is exact; in another, elastic."""
    saved = elastic.checkpoint_layout(folder)
    reshard = saved.world_size != now.world_size
    convert = partial(elastic.universal_checkpoint, folder)
    problem = agree_on_failure(convert if reshard and rank == 0 else None)
    said: list[str] = []
    try:
        problem = problem or agree_on_failure(
            partial(load_states, folder, engine, loader, rank=rank, saved=saved, now=now, said=said)
        )
    finally:
        if reshard and rank == 0:
            elastic.remove_universal(folder)  # every rank has loaded it: agree_on_failure waits for all
    if problem is None and (saved.world_size, saved.workers) != (now.world_size, now.workers):
        resharded = "weights and optimizer state resharded; " if reshard else ""
        return None, f"; elastic resume from {saved.describe()}: {resharded}{' '.join(said)}"
    return problem, ""


def load_states(
    folder: Path,
    engine: Engine,
    loader: StreamingLoader,
    *,
    rank: int,
    saved: elastic.Layout,
    now: elastic.Layout,
    said: list[str],
) -> None:
    """DeepSpeed's state (from its universal form on another world size), the teacher, and the data and RNG
    position: this rank's own in the same layout, continued from every old rank's in another."""
    if saved.world_size == now.world_size:
        engine.load(folder.parent, folder.name)
    else:
        universal = elastic.universal_folder(folder)
        engine.load(universal.parent, universal.name, universal=True)
    engine.model.teacher.load_state_dict(checkpoint.load_teacher(folder))
    if (saved.world_size, saved.workers) == (now.world_size, now.workers):
        state = checkpoint.load_rank_state(folder, rank)
        loader.load_state_dict(state["loader"])
        checkpoint.set_rng_state(state["rng"])
        return
    states = [checkpoint.load_rank_state(folder, old_rank) for old_rank in range(saved.world_size)]
    said.append(loader.continue_elastically([state["loader"] for state in states]))
    checkpoint.set_rng_state(elastic.rng_state_for(rank, [state["rng"] for state in states]))


def save_checkpoint(
    cfg: ExperimentConfig,
    run_dir: Path,
    engine: Engine,
    loader: StreamingLoader,
    step: int,
    *,
    rank: int,
    world_size: int,
    owner: RunDirOwner | None = None,
) -> Path:
    """Write checkpoints/step_N and exports/step_N, make them durable on every rank, then COMPLETE; every rank
    calls it. A failure on any rank (a full disk) ends the run on every rank; the previous checkpoint is intact.
    Nothing is written when `owner` lost the run directory to another run."""
    check_owner(owner, rank=rank)
    name = layout.tag(step)
    folder = layout.checkpoint_folder(run_dir, step)
    export = layout.export_folder(run_dir, step)

    def write_files() -> None:
        engine.save(folder.parent, name)
        checkpoint.save_rank_state(folder, rank, {"loader": loader.state_dict(), "rng": checkpoint.rng_state()})
        with engine.gathered(engine.model.encoder) as encoder:
            if rank == 0:
                save_hf(encoder, export)
                checkpoint.save_teacher(folder, engine.model.teacher.state_dict())
                checkpoint.save_config_copy(folder, cfg)
        checkpoint.make_durable(folder)
        if rank == 0:
            checkpoint.make_durable(export)

    def commit() -> None:  # rank 0, once every rank's files are durable
        marker = checkpoint.marker_content(step, cfg.digest(), world_size, checkpoint.file_digests(folder))
        checkpoint.write_marker(folder, marker)
        checkpoint.prune(run_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every, current=step)

    make_way = partial(checkpoint.set_aside, folder)
    for action in (make_way if rank == 0 else None, write_files, commit if rank == 0 else None):
        failure = agree_on_failure(action)
        if failure is not None:
            raise TrainingAbortedError(
                f"the checkpoint {folder} could not be written: {failure} ({checkpoint.free_space(folder)})."
                " The previous complete checkpoint is intact: make room (or fix the folder), then run the same"
                " command to resume from it"
            )
    return folder
