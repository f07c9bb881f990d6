"""The student under DeepSpeed, behind the few calls the train loop makes; the loop never touches DeepSpeed itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import Tensor

from model import Music2Vec
from trainer.config import ExperimentConfig
from trainer.ds_config import deepspeed_config


def build_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on every parameter (data2vec defines no parameter groups)."""
    o = cfg.optim
    kwargs = {"lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if torch.cuda.is_available() and not cfg.train.offload:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(model.parameters(), adam_w_mode=True, **kwargs)
    if cfg.train.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), **kwargs)


class Engine:
    """Forward/backward/step of the pretraining module with ZeRO, mixed precision and gradient accumulation."""

    def __init__(self, model: Music2Vec, cfg: ExperimentConfig, world_size: int) -> None:
        self.config = deepspeed_config(cfg, world_size)
        self.ds, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, cfg), config=self.config, dist_init_required=False
        )
        self.model: Music2Vec = self.ds.module
        self.device = self.ds.device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.train.precision]

    def forward(self, audio: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        audio = audio.to(self.device, self.dtype, non_blocking=True)
        return self.ds(audio, mask.to(self.device, non_blocking=True))

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss)

    def at_update_boundary(self) -> bool:
        """Whether the next `step` finishes an optimizer update (the last micro-batch of an accumulation)."""
        return self.ds.is_gradient_accumulation_boundary()

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> bool:
        """Accumulate, or at a boundary update the weights; True when an update was applied (not an fp16 overflow)."""
        boundary = self.at_update_boundary()
        self.ds.step()
        return boundary and self.ds.was_step_applied()

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        return float(self.ds.loss_scale()) if self.ds.fp16_enabled() else None

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`module` (a part of the student) with whole weights on every rank: a read-only all-gather under ZeRO-3."""
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module

    def save(self, root: Path, tag: str) -> None:
        """DeepSpeed's part of a checkpoint (weights and optimizer, sharded as ZeRO keeps them); a collective call."""
        self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load(self, root: Path, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{root / tag}: DeepSpeed found no checkpoint to load")

    def memory(self) -> dict[str, Any]:
        if torch.cuda.is_available():
            return {"gpu_max_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 2**30}
        return {}
