"""Distributed environment: a submitit task, torchrun / the deepspeed launcher or a single process, as one description.

torchrun and the deepspeed launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; in a job that
`music2vec launch` submitted, submitit derives them from SLURM's variables (or its local executor's); a plain
`music2vec train` gets a one-rank world on a free local port. The process group uses NCCL on GPUs and gloo on CPU.

A rank trains on a GPU whenever torch can use one. Where GPUs were asked for and torch cannot use any (a driver
too old for this torch's CUDA, a CPU-only torch), the rank refuses to start instead of training on the CPU for days.
torch is imported by the functions that need it: the CLI imports this module for its error type.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path


@dataclass(frozen=True)
class DistributedEnvironment:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_world_size: int = 1

    def export(self) -> None:
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def from_environment() -> DistributedEnvironment:
    """What a launcher exported, or a single local rank."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistributedEnvironment(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ["WORLD_SIZE"]),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(os.environ.get("MASTER_PORT", "29500")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    return DistributedEnvironment(0, 0, 1, "127.0.0.1", free_port())


def from_submitit() -> DistributedEnvironment:
    """Inside a submitit task: ranks from the job's tasks, the first node as master, a port fixed by the job id.

    The port stays the same when the job is requeued; every task of a job computes the same one.
    """
    from submitit.helpers import TorchDistributedEnvironment

    job = TorchDistributedEnvironment()
    return DistributedEnvironment(
        rank=job.rank,
        local_rank=job.local_rank,
        world_size=job.world_size,
        master_addr=job.master_addr,
        master_port=job.master_port,
        local_world_size=job.local_world_size,
    )


# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor version compatibility).
MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
NVIDIA_CONTROL_DEVICE = Path("/dev/nvidiactl")  # present where an NVIDIA driver is loaded
NO_DEVICES = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


class GPUUnavailableError(RuntimeError):
    """GPUs were asked for, and this torch cannot use any of them."""


def gpus_requested(
    *,
    job_gpus: int | None = None,
    environ: Mapping[str, str] = os.environ,
    control_device: Path = NVIDIA_CONTROL_DEVICE,
) -> str | None:
    """Why this rank is expected to train on a GPU, or None where the CPU is meant.

    A launched job says it (`cluster.gpus_per_node`). Otherwise an empty CUDA_VISIBLE_DEVICES means the CPU on purpose,
    and SLURM's GPU allocation or an NVIDIA driver on the node mean GPUs. A listed CUDA_VISIBLE_DEVICES is no evidence:
    the deepspeed launcher lists `--num_gpus` devices on CPU-only machines too; nor are several ranks on one machine:
    CPU-only runs with several ranks are legitimate.
    """
    if job_gpus is not None:
        return f"the job asked for {job_gpus} GPU(s) per node" if job_gpus > 0 else None
    if environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in NO_DEVICES:
        return None
    if int(environ.get("SLURM_GPUS_ON_NODE", "0") or "0") > 0:
        return f"SLURM allocated {environ['SLURM_GPUS_ON_NODE']} GPU(s) on this node"
    if control_device.exists():
        return f"this node has an NVIDIA driver ({control_device})"
    return None


def gpu_unavailable_message(requested_because: str) -> str:
    """What a user needs when torch cannot use the GPUs they asked for: why not, and which driver this torch needs."""
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        needs = f"torch {torch.__version__} is built without CUDA: install a CUDA build of torch"
    else:
        driver = MIN_DRIVER.get(cuda.split(".")[0], f"the one CUDA {cuda} names")
        needs = (
            f"torch {torch.__version__} is built for CUDA {cuda}, which needs an NVIDIA driver >= {driver}"
            " (nvidia-smi shows the node's): update the driver, or install a torch built for an older CUDA"
        )
    return (
        f"GPUs were asked for ({requested_because}) but torch cannot use any: {_cuda_failure()}. {needs}. To train on"
        " the CPU on purpose, set CUDA_VISIBLE_DEVICES= (empty), or launch with --gpus-per-node 0"
    )


def _cuda_failure() -> str:
    """The first line of torch's own reason for not initialising CUDA (no driver, a driver too old, no GPU)."""
    import torch

    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as error:
        return str(error).strip().splitlines()[0].rstrip(".")
    return "no CUDA device is visible"


def cuda_device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The GPU a rank uses among the `visible` ones: its local rank where every rank sees every GPU of the node; the
    only one where the scheduler binds one GPU to each task (`--gpus-per-task`, cgroup binding)."""
    if visible == 1:
        return 0
    if visible >= local_world_size and local_rank < visible:
        return local_rank
    raise GPUUnavailableError(
        f"local rank {local_rank} of {local_world_size} sees {visible} GPUs: expected one GPU per task, or every"
        " GPU of the node for every task; ask the scheduler for one task per GPU"
    )


def init_distributed(env: DistributedEnvironment, *, job_gpus: int | None = None, timeout_s: int = 600) -> None:
    """Start the process group DeepSpeed uses: NCCL with one GPU per rank, or gloo where the CPU is meant.

    `job_gpus`: the GPUs per node a launched job asked for; None outside a job (the environment tells, see
    `gpus_requested`). DeepSpeed learns the chosen GPU from the current device (see trainer.engine).
    `timeout_s` (train.collective_timeout_s): how long a collective waits for a rank that died or hangs before it
    fails, ending the run on every rank (torch's default is 30 minutes for gloo and 10 for NCCL).
    """
    import deepspeed
    import torch

    env.export()
    if torch.cuda.is_available():
        index = cuda_device_index(env.local_rank, env.local_world_size, torch.cuda.device_count())
        torch.cuda.set_device(index)
    elif (reason := gpus_requested(job_gpus=job_gpus)) is not None:
        raise GPUUnavailableError(gpu_unavailable_message(reason))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        skip_shared_memory_collectives()
    timeout = timedelta(seconds=timeout_s)
    default_timeout_for_new_groups(timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


def skip_shared_memory_collectives() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory collectives when it starts a gloo group.

    It builds them from C++ at its first CPU start in every environment (half a minute, and a failed run where
    there is no compiler), for its inference all-reduce alone: training reduces over gloo. DeepSpeed keeps the
    answer to "can this op be built here" in one dict, read when the group starts, and edits to it persist.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def default_timeout_for_new_groups(timeout: timedelta) -> None:
    """Make `timeout` the one every process group created from now on takes.

    DeepSpeed runs the gradient all-reduce, where the ranks wait longest for a hung one, over a clone of the world
    group that it creates with `new_group(ranks)`: no timeout, so torch's default (30 minutes for gloo, 10 for NCCL)
    rather than the world group's. torch reads that default from these two globals each time a group is created.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
