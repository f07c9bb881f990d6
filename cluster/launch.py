"""`music2vec launch`: check everything that can be checked on the login node, then submit one job through submitit.

A job is N nodes x G tasks (one per GPU, or `tasks_per_node` on CPUs); each task is one rank of the same
`TrainingJob`. Nothing is queued unless the config, the shards, the DeepSpeed config at this world size and the run
directory are all in order: a mistake costs seconds on the login node, not hours in the queue.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from cluster import attempts, lease
from cluster.config import ClusterConfig
from cluster.job import TrainingJob
from cluster.submit import check_submittable, log_folder, scheduler_lines, submit_job
from data.audio import SAMPLE_RATE
from data.loader import check_shard_count, shard_urls
from trainer import elastic
from trainer.config import ExperimentConfig, check_run_dir
from trainer.ds_config import deepspeed_config
from trainer.layout import JOBS
from trainer.rundir import check_writers, open_run_dir
from trainer.toolchain import check_toolchain


@dataclass(frozen=True)
class LaunchPlan:
    experiment: ExperimentConfig  # data.workers sized for the task's CPUs; train.grad_accum fitted to a checkpoint
    cluster: ClusterConfig
    shards: int
    workdir: Path  # where relative paths in the config point; the job runs there too
    resume: str | None = None  # how the job continues the run directory's newest checkpoint, in words

    @property
    def run_dir(self) -> Path:
        return self.workdir / self.experiment.train.run_dir


def plan_launch(
    experiment: ExperimentConfig,
    cluster: ClusterConfig,
    *,
    allow_config_change: bool,
    allow_batch_change: bool = False,
    take_over: bool = False,
) -> LaunchPlan:
    """Validate a launch without submitting anything; each problem is a ValueError naming the key, file or value."""
    experiment = replace(experiment, data=experiment.data.sized_for(cluster.cpus_per_task))
    run_dir = Path.cwd() / experiment.train.run_dir
    experiment, resume = plan_resume(experiment, run_dir, cluster.world_size, allow_batch_change=allow_batch_change)
    if experiment.train.precision == "fp16" and cluster.gpus_per_node == 0:
        raise ValueError("train.precision=fp16 needs GPUs (cluster.gpus_per_node=0); use bf16 or fp32")
    shards = reachable_shards(experiment)
    check_shard_count(shards, experiment.data, cluster.world_size)
    deepspeed_config(experiment, cluster.world_size)  # a template contradicting this world size fails here
    check_toolchain(experiment, on_gpu=cluster.gpus_per_node > 0)  # the login node stands in for the job's nodes
    plan = LaunchPlan(experiment, cluster, shards, Path.cwd(), resume)
    check_run_dir(experiment, plan.run_dir, allow_config_change=allow_config_change)
    check_writable(plan.run_dir)
    if plan.run_dir.is_dir():
        check_writers(plan.run_dir, shared_group=experiment.train.shared_group)
    lease.check_free(plan.run_dir, take_over=take_over)
    return plan


def plan_resume(
    experiment: ExperimentConfig, run_dir: Path, world_size: int, *, allow_batch_change: bool
) -> tuple[ExperimentConfig, str | None]:
    """The experiment fitted to the run directory's newest checkpoint (train.grad_accum keeping its global batch on
    this world size), and how the job will resume it, in words; None for a new run."""
    fitted, change, newest = elastic.fit_to_newest_checkpoint(
        experiment, run_dir, world_size, allow_batch_change=allow_batch_change
    )
    if newest is None:
        return experiment, None
    step, saved = newest
    now = elastic.run_layout(fitted, world_size)
    if (saved.world_size, saved.workers) == (now.world_size, now.workers):
        return fitted, f"resume: exact, from step {step} ({saved.describe()})"
    lines = [
        f"resume: elastic, from step {step}: written by {saved.describe()}; this job: {now.describe()}",
        *([f"  {change}"] if change else []),
        *(
            ["  weights and optimizer state resharded through DeepSpeed's universal checkpoint"]
            if saved.world_size != now.world_size
            else []
        ),
        "  the loader reads what the old streams had not reached of the epoch, then goes on in the new layout",
    ]
    return fitted, "\n".join(lines)


def reachable_shards(cfg: ExperimentConfig) -> int:
    """How many shards `data.shards` names, after checking that the local ones exist (URLs are left to the job)."""
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: set it to a manifest.json from `music2vec shard`, or a URL pattern")
    urls = shard_urls(cfg.data.shards)
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards in data.shards={cfg.data.shards} do not exist here, e.g."
            f" {missing[0]}; the job's nodes must see the same paths as this machine"
        )
    return len(urls)


def check_writable(run_dir: Path) -> None:
    """The run directory, or the folder it will be created in, must be a writable folder (nothing is created yet)."""
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"train.run_dir={run_dir} cannot be written: {existing} is not a writable folder")


def describe(plan: LaunchPlan) -> str:
    """The dry run's report: resolved config, world, batch arithmetic and the scheduler parameters."""
    cfg, cluster = plan.experiment, plan.cluster
    crops = cfg.data.batch_size * cfg.train.grad_accum
    seconds = crops * cfg.data.crop_seconds
    world = cluster.world_size
    devices = f"{cluster.gpus_per_node} GPUs" if cluster.gpus_per_node else f"{cluster.tasks} CPU tasks"
    streams = world * max(cfg.data.workers, 1)
    world_line = (
        f"world: {cluster.nodes} node(s) x {devices} = {world} ranks; {cfg.data.workers} loader workers per rank"
        f" (cluster.cpus_per_task={cluster.cpus_per_task}); {plan.shards} shards for {streams} loader streams"
    )
    per_rank = (
        f"per rank: {cfg.data.batch_size} crops x {cfg.data.crop_seconds:g} s per micro-batch,"
        f" x {cfg.train.grad_accum} micro-batches = {crops} crops = {seconds / 60:.1f} min of audio per update"
    )
    samples = crops * world * round(cfg.data.crop_seconds * SAMPLE_RATE)
    total_hours = seconds * world * cfg.optim.max_updates / 3600
    global_line = (
        f"global: {crops * world} crops = {seconds * world / 60:.1f} min of audio ({samples / 1e6:.2f} M samples)"
        f" per update; {cfg.optim.max_updates} updates = {total_hours:,.0f} h of audio"
    )
    lines = [
        "# resolved experiment config",
        OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())).rstrip(),
        "",
        world_line,
        per_rank,
        global_line,
        f"run directory: {plan.run_dir}",
        *([plan.resume] if plan.resume else []),
        "",
        f"# {cluster.executor} job",
        *scheduler_lines(cluster, log_folder(plan.run_dir / JOBS, cluster)),
    ]
    return "\n".join(lines) + "\n"


def submit(
    plan: LaunchPlan, *, allow_config_change: bool, allow_batch_change: bool = False, take_over: bool = False
) -> submitit.Job:
    """Queue the job (SLURM) or start it (local processes), holding the run directory's lease for it, and note the
    submission in the run directory."""
    check_submittable(plan.cluster, option="cluster.executor")  # a dry run needs no SLURM; this does
    open_run_dir(plan.run_dir, shared_group=plan.experiment.train.shared_group)  # the job inherits the umask
    claim = lease.Lease("launch", take_over=take_over)
    taken_over = claim.claim(plan.run_dir)  # of two launches at the same moment, one gets here
    if taken_over:
        print(taken_over, file=sys.stderr, flush=True)
    try:
        job = TrainingJob(
            plan.experiment,
            workdir=str(plan.workdir),
            gpus_per_node=plan.cluster.gpus_per_node,
            executor=plan.cluster.executor,
            allow_config_change=allow_config_change,
            allow_batch_change=allow_batch_change,
        )
        submitted = submit_job(
            job, plan.cluster, log_folder(plan.run_dir / JOBS, plan.cluster), max_requeues=plan.cluster.max_requeues
        )
    except BaseException:
        claim.release()
        raise
    local = plan.cluster.executor == "local"
    claim.hand_to_job(submitted.job_id, plan.cluster.executor, pid=int(submitted.job_id) if local else None)
    attempts.record(
        plan.run_dir,
        "submitted",
        job_id=submitted.job_id,
        executor=plan.cluster.executor,
        world_size=plan.cluster.world_size,
        logs=str(submitted.paths.folder),
    )
    return submitted
