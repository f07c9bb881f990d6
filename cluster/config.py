"""The resources a launched job asks for: the `cluster:` section of an experiment YAML, overridden by launch flags.

The section lives beside model/data/optim/train in the same YAML, so one file says what to train and where; it is
not part of the experiment's digest, because where a run executes does not change what it computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from trainer.config import ExperimentConfig, config_errors, experiment_config, read_layers

Executor = Literal["slurm", "local"]

# SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


@dataclass(frozen=True)
class ClusterConfig:
    executor: Executor = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0  # 0: one per GPU (the only layout on GPUs); set it for a CPU-only job
    cpus_per_task: int = 10  # one runs the trainer, the rest are data.workers=-1's decoding workers
    partition: str = ""
    time: str = "3-00:00:00"  # the time limit of one attempt, in sbatch's format; a longer run requeues itself
    account: str = ""
    qos: str = ""
    constraint: str = ""
    mem: str = ""  # per node, as sbatch --mem (e.g. 480G); empty: the partition's default
    max_requeues: int = 20  # requeues after the time limit before the job gives up; preemptions do not count
    signal_delay_s: int = 120  # the requeue signal comes this long before the limit: room for one checkpoint
    job_name: str = "music2vec"

    def __post_init__(self) -> None:
        one_task_per_gpu = self.gpus_per_node == 0 or self.tasks_per_node in (0, self.gpus_per_node)
        checks = [
            (self.nodes >= 1, f"cluster.nodes={self.nodes} must be >= 1"),
            (self.gpus_per_node >= 0, f"cluster.gpus_per_node={self.gpus_per_node} must be >= 0"),
            (one_task_per_gpu, f"cluster.tasks_per_node={self.tasks_per_node}: a GPU job runs one task per GPU"),
            (self.tasks_per_node >= 0, f"cluster.tasks_per_node={self.tasks_per_node} must be >= 0"),
            (self.cpus_per_task >= 1, f"cluster.cpus_per_task={self.cpus_per_task} must be >= 1"),
            (self.executor != "local" or self.nodes == 1, "cluster.executor=local runs on one node: set nodes=1"),
            (self.max_requeues >= 0, f"cluster.max_requeues={self.max_requeues} must be >= 0"),
            (self.signal_delay_s >= 0, f"cluster.signal_delay_s={self.signal_delay_s} must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if not problems and self.timeout_min * 60 <= self.signal_delay_s:
            problems.append(
                f"cluster.time={self.time} leaves no time before the requeue signal"
                f" (cluster.signal_delay_s={self.signal_delay_s})"
            )
        if problems:
            raise ValueError("invalid cluster config: " + "; ".join(problems))

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU, or `tasks_per_node` (at least one) without GPUs."""
        return self.gpus_per_node or max(self.tasks_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks

    @property
    def timeout_min(self) -> int:
        return slurm_minutes(self.time)


def slurm_minutes(text: str) -> int:
    """Minutes in a SLURM time limit ("90", "1:30:00", "3-00:00:00", ...), rounded up."""
    match = _SLURM_TIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"cluster.time={text!r} is not a SLURM time (M, H:M:S, D-H, D-H:M:S, ...)")
    days, *clock = match.groups()
    parts = [int(part) for part in clock if part is not None]
    hours_first = days is not None or None not in clock  # D-H[:M[:S]] and H:M:S; otherwise M[:S]
    units = (3600, 60, 1) if hours_first else (60, 1)
    total = int(days or 0) * 86400 + sum(part * unit for part, unit in zip(parts, units, strict=False))
    if total <= 0:
        raise ValueError(f"cluster.time={text!r} must be positive")
    return -(-total // 60)


def load_job_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ExperimentConfig, ClusterConfig]:
    """An experiment YAML + `key=value` overrides, split into what to train and the resources to train it on."""
    layers = read_layers(path, overrides)
    cluster_layers = [layer.pop("cluster") for layer in layers if "cluster" in layer]
    with config_errors(str(path)):
        experiment = experiment_config(layers)
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), *cluster_layers)
        cluster: ClusterConfig = OmegaConf.to_object(merged)
    return experiment, cluster


def with_flags(cluster: ClusterConfig, flags: dict[str, Any]) -> ClusterConfig:
    """Command-line flags win over the config's `cluster:` section; flags left unset (None) change nothing."""
    names = {field.name for field in fields(ClusterConfig)}
    return replace(cluster, **{name: value for name, value in flags.items() if name in names and value is not None})
