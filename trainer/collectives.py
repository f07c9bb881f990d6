"""Scalar agreement across ranks: every rank must take the same branch wherever a collective may follow."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_scalar(value: float, op: dist.ReduceOp.RedOpType = dist.ReduceOp.MAX) -> float:
    """`value` reduced over all ranks (itself when there is one rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    nccl = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())
