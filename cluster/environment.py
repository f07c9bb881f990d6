"""Distributed environment: a submitit task, torchrun / the deepspeed launcher or a single process, as one description.

torchrun and the deepspeed launcher export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; in a job that
`music2vec launch` submitted, submitit derives them from SLURM's variables (or its local executor's); a plain
`music2vec train` gets a one-rank world on a free local port. The process group uses NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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


def init_distributed(env: DistributedEnvironment) -> None:
    """Start the process group DeepSpeed uses (NCCL with one GPU per rank, gloo on CPU)."""
    import deepspeed

    env.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
