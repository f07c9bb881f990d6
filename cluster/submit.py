"""How every job the project queues reaches the scheduler: training (`music2vec launch`), the nightly probes and
corpus sharding (`music2vec shard --array`).

One place turns a `ClusterConfig` into a submitit executor (SLURM, or local processes), checks that `sbatch` is
there before anything is claimed or queued, and names the job's log folder.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import submitit

from cluster.config import ClusterConfig

SUBMIT_COMMAND = "python -u -m submitit.core._submit"  # what submitit's sbatch script runs


def check_submittable(cluster: ClusterConfig, *, option: str) -> None:
    """A SLURM job needs `sbatch`: fail before anything is claimed or queued. `option` is how the user chose SLURM."""
    if cluster.executor == "slurm" and shutil.which("sbatch") is None:
        raise ValueError(
            f"{option}=slurm, but sbatch is not on PATH: submit from a SLURM login node, or use the local executor"
        )


def log_folder(parent: Path, cluster: ClusterConfig) -> Path:
    """parent/<SLURM job id>/; a local job's id is a process id, which the system reuses, so it gets a dated folder
    (submitit would otherwise find an old job's result there)."""
    return parent / ("%j" if cluster.executor == "slurm" else time.strftime("local-%Y%m%d-%H%M%S"))


def slurm_parameters(cluster: ClusterConfig, *, begin_in_s: int | None = None) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters; `begin_in_s`: the job may start only that long from now."""
    # requeueable, so SLURM itself requeues the job after a node failure or a preemption
    additional: dict[str, Any] = {"requeue": True} | ({"begin": f"now+{begin_in_s}"} if begin_in_s else {})
    parameters: dict[str, Any] = {
        "job_name": cluster.job_name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks,
        "cpus_per_task": cluster.cpus_per_task,
        "time": cluster.timeout_min,
        "signal_delay_s": cluster.signal_delay_s,
        "stderr_to_stdout": True,
        "additional_parameters": additional,
    }
    if cluster.gpus_per_node:
        parameters["gpus_per_node"] = cluster.gpus_per_node
    optional = {"partition": cluster.partition, "account": cluster.account, "qos": cluster.qos}
    optional |= {"constraint": cluster.constraint, "mem": cluster.mem}
    return parameters | {name: value for name, value in optional.items() if value}


def local_parameters(cluster: ClusterConfig) -> dict[str, Any]:
    return {
        "tasks_per_node": cluster.tasks,
        "gpus_per_node": cluster.gpus_per_node,
        "timeout_min": cluster.timeout_min,
        "signal_delay_s": cluster.signal_delay_s,
    }


def scheduler_lines(cluster: ClusterConfig, folder: Path) -> list[str]:
    """What would be submitted, for a dry run: the #SBATCH lines submitit's own writer makes, or the local
    executor's parameters."""
    if cluster.executor == "local":
        return [f"{name}={value}" for name, value in local_parameters(cluster).items()]
    script = submitit.slurm.slurm._make_sbatch_string(
        command=SUBMIT_COMMAND, folder=str(folder), **slurm_parameters(cluster)
    )
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


class SchedulerRefusedError(RuntimeError):
    """sbatch did not queue the job (the controller is down, a partition or account does not exist, ...)."""


@contextlib.contextmanager
def scheduler_refusals() -> Iterator[None]:
    """submitit's error for a refused submission, as one line that says what sbatch said."""
    try:
        yield
    except submitit.core.utils.FailedJobError as error:
        said = [line for line in str(error).splitlines() if line.strip()]
        raise SchedulerRefusedError(f"sbatch did not queue the job: {said[-1] if said else error}") from None


def submit_job(
    job: Callable[[], Any],
    cluster: ClusterConfig,
    folder: Path,
    *,
    max_requeues: int,
    begin_in_s: int | None = None,
) -> submitit.Job:
    """Queue `job` on SLURM (starting `begin_in_s` from now, if given), or start it as local processes; submitit
    requeues it up to `max_requeues` times after a timeout or preemption (the job's `checkpoint` decides)."""
    with scheduler_refusals():
        return executor(cluster, folder, max_requeues=max_requeues, begin_in_s=begin_in_s).submit(job)


def submit_array(
    jobs: Sequence[Callable[[], Any]], cluster: ClusterConfig, folder: Path, *, max_requeues: int
) -> list[submitit.Job]:
    """Queue `jobs` as one SLURM job array (a local process each with the local executor); requeued as `submit_job`."""
    pool = executor(cluster, folder, max_requeues=max_requeues)
    with scheduler_refusals(), pool.batch():  # submitit queues the whole list, as one array, when the block ends
        return [pool.submit(job) for job in jobs]


def executor(
    cluster: ClusterConfig, folder: Path, *, max_requeues: int, begin_in_s: int | None = None
) -> submitit.Executor:
    if cluster.executor == "slurm":
        slurm = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
        slurm.update_parameters(**slurm_parameters(cluster, begin_in_s=begin_in_s))
        return slurm
    local = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
    local.update_parameters(**local_parameters(cluster))
    return local
