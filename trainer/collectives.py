"""Scalar agreement across ranks: every rank must take the same branch wherever a collective may follow."""

from __future__ import annotations

from collections.abc import Callable

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


def agree_on_failure(action: Callable[[], object] | None) -> str | None:
    """Run `action` on this rank (None: nothing to do here) and agree on the outcome: None when it succeeded on every
    rank, else why it failed (this rank's error, or that another rank failed). Every rank then takes the same
    branch: a step that only one rank does (rank 0 writing a file) cannot leave the others waiting in the next
    collective."""
    try:
        if action is not None:
            action()
        message = None
    except Exception as error:  # noqa: BLE001 - whatever went wrong, every rank must hear of it
        message = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
    if reduce_scalar(float(message is not None)) == 0:
        return None
    return message or "it failed on another rank (that rank's log says why)"
