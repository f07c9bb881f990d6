"""EMA teacher: the decay schedule and the fused in-place update."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def ema_decay(step: int, *, start: float, end: float, anneal_steps: int) -> float:
    """Teacher decay once `step` optimizer updates are done.

    1) linear from `start` at step 0 to `end` at step `anneal_steps`;
    2) `end` from then on.
    fairseq applies the update with decay(n) right after the n-th optimizer update (n = 1, 2, ...).
    """
    if step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


class EMATeacher:
    """An fp32 exponential moving average of the student's transformer.

    Deliberately a plain object, not an `nn.Module` attribute of the model: the teacher is invisible to
    `.parameters()`, so to the optimizer and weight decay, to DeepSpeed's precision casts and ZeRO partitioning, and
    to gradient all-reduce. It is always in eval mode (no dropout, no LayerDrop) and never requires grad.

    Parameters whose names start with one of `copied_prefixes` (the positional conv: fairseq's `ema_layers_only`,
    docs/ALGORITHM.md §6) are copied from the student at every update instead of averaged.

    ZeRO-3: the student's parameters are then partitioned across ranks and each local `param` is an empty
    placeholder. The trainer calls `update` inside `deepspeed.zero.GatheredParameters(student_params)`, a read-only
    all-gather that materialises the full weights on every rank for the duration of the block (the transformer of
    `base` is 88.6 M parameters, 177 MB in bf16); every rank then holds the same full fp32 teacher, which its
    forward needs anyway.
    """

    def __init__(self, student: nn.Module, *, copied_prefixes: tuple[str, ...] = ("pos_conv.",)) -> None:
        self.model = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.copied_prefixes = copied_prefixes
        names = [name for name, _ in self.model.named_parameters()]
        self._copied_names = [name for name in names if name.startswith(copied_prefixes)]
        self._averaged_names = [name for name in names if not name.startswith(copied_prefixes)]

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, one fused lerp per student dtype; copy the rest."""
        student_params = dict(student.named_parameters())
        teacher_params = dict(self.model.named_parameters())
        averaged = [teacher_params[name] for name in self._averaged_names]
        sources = [student_params[name].detach() for name in self._averaged_names]
        for teacher, source in _group_by_dtype(averaged, sources):
            torch._foreach_lerp_(teacher, source, 1.0 - decay)
        if self._copied_names:
            torch._foreach_copy_(
                [teacher_params[name] for name in self._copied_names],
                [student_params[name].detach() for name in self._copied_names],
            )

    def to(self, device: torch.device | str) -> EMATeacher:
        self.model.to(device)  # parameters keep their identity: the name lists stay valid
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state)


def _group_by_dtype(teacher: list[Tensor], student: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Split into one (teacher, student) list pair per student dtype; non-fp32 student tensors are upcast."""
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for t, s in zip(teacher, student, strict=True):
        group = groups.setdefault(s.dtype, ([], []))
        group[0].append(t)
        group[1].append(s)
    # _foreach_lerp_ needs matching dtypes; a bf16/fp16 student is widened once per update (fairseq's fp32 shadow, §6).
    return [(t, s if dtype == torch.float32 else [x.float() for x in s]) for dtype, (t, s) in groups.items()]
