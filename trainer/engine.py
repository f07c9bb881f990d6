"""The student under DeepSpeed, behind the few calls the train loop makes; the loop never touches DeepSpeed itself."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import deepspeed
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor

from model import Music2Vec
from trainer.checkpoint import CheckpointError, unreadable
from trainer.config import ExperimentConfig, OptimConfig
from trainer.ds_config import deepspeed_config

# The classes DeepSpeed pickles into its checkpoint files besides tensors and containers (ZeRO 1-3, fp32/bf16/fp16).
# Plain data: unpickling one sets its attributes and runs nothing else.
DEEPSPEED_STATE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every load, whatever the caller asked


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every `torch.load` in the block loads only tensors, containers and DEEPSPEED_STATE_CLASSES, also where the
    caller (DeepSpeed's consolidation, its universal checkpoint) asks for `weights_only=False`: a file planted in a
    checkpoint must not run code.

    Re-entrant, unlike torch's `safe_globals`, whose exit removes its classes even when an enclosing context had
    added them: only the outermost block here enters and leaves it."""
    if _WeightsOnlyNesting.depth:
        yield
        return
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    _WeightsOnlyNesting.depth += 1
    try:
        with torch.serialization.safe_globals(DEEPSPEED_STATE_CLASSES):
            yield
    finally:
        _WeightsOnlyNesting.depth -= 1
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


class _WeightsOnlyNesting:
    """How deeply `weights_only_loading` blocks are nested in this process now."""

    depth = 0


OptimizerChoice = Literal["torch_adamw_fused", "torch_adamw", "deepspeed_cpu_adam"]


def optimizer_choice(device_type: str, *, offload: bool) -> OptimizerChoice:
    """Which AdamW implementation steps the weights.

    - ZeRO-Offload keeps the optimizer state in CPU memory, where DeepSpeed insists on its own CPU Adam; DeepSpeed
      builds it from C++ source when the run starts (`trainer.toolchain` checks for a compiler before anything
      starts);
    - on a GPU, torch's fused AdamW: one kernel for all parameters, shipped compiled with torch, so a GPU node needs
      no compiler (DeepSpeed's FusedAdam is compiled with nvcc at start, against this torch's CUDA);
    - on the CPU, torch's multi-tensor AdamW.
    """
    if offload:
        return "deepspeed_cpu_adam"
    return "torch_adamw_fused" if device_type == "cuda" else "torch_adamw"


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, choice: OptimizerChoice) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on every parameter (data2vec defines no parameter groups)."""
    kwargs = {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay}
    if choice == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    fused = True if choice == "torch_adamw_fused" else None  # None: torch's default, multi-tensor
    return torch.optim.AdamW(model.parameters(), fused=fused, **kwargs)


def current_device() -> torch.device:
    """This rank's device: the GPU `cluster.environment.init_distributed` made current, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Engine:
    """Forward/backward/step of the pretraining module with ZeRO, mixed precision and gradient accumulation."""

    def __init__(self, model: Music2Vec, cfg: ExperimentConfig, world_size: int) -> None:
        self.config = deepspeed_config(cfg, world_size)
        device = current_device()
        optimizer = build_optimizer(model, cfg.optim, optimizer_choice(device.type, offload=cfg.train.offload))
        if cfg.train.compile:
            model.compile_blocks()
        # Saved into every checkpoint: DeepSpeed's universal-checkpoint converter (an elastic resume) requires it.
        setattr(
            model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        )
        # DeepSpeed would take GPU number LOCAL_RANK, which does not exist where the scheduler binds one GPU per task.
        args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
        self.ds, *_ = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, config=self.config, dist_init_required=False
        )
        self.ds.checkpoint_engine = WeightsOnlyCheckpointEngine(self.ds.checkpoint_engine)
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
        """fp16's current dynamic loss scale (the engine's own `loss_scale()` is the configured one: 0 for dynamic)."""
        return float(self.ds.optimizer.loss_scale) if self.ds.fp16_enabled() else None

    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`module` (a part of the student) with whole weights on every rank: a read-only all-gather under ZeRO-3."""
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module

    def save(self, root: Path, tag: str) -> None:
        """DeepSpeed's part of a checkpoint (weights and optimizer, sharded as ZeRO keeps them); a collective call."""
        self.ds.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load(self, root: Path, tag: str, *, universal: bool = False) -> None:
        """DeepSpeed's part of a checkpoint; CheckpointError names a file that cannot be read or is refused.
        `universal`: a universal checkpoint (`trainer.elastic.universal_checkpoint`), written by another world size."""
        self.ds._config.load_universal_checkpoint = universal
        try:
            with weights_only_loading():  # the universal loader calls torch.load itself, not the checkpoint engine
                path, _ = self.ds.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise CheckpointError(f"{root / tag}: DeepSpeed found no checkpoint to load")

    def memory(self) -> dict[str, float]:
        """Peak GPU memory since the last call, in GiB: held by tensors, and reserved by torch's caching allocator."""
        if self.device.type != "cuda":
            return {}
        peaks = {
            "gpu_max_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 2**30,
            "gpu_max_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30,
        }
        torch.cuda.reset_peak_memory_stats(self.device)
        return peaks


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save/torch.load checkpoint engine, loading with `weights_only=True`.

    DeepSpeed's own engine unpickles with `weights_only=False`: a file planted in a run directory would run its code
    on every rank at the next resume. Here only tensors, containers and DeepSpeed's few plain state classes load.
    """

    def __init__(self, configured: object) -> None:
        if type(configured) is not TorchCheckpointEngine:  # a writer set in the DeepSpeed template: nothing else loads
            raise ValueError(
                f"the DeepSpeed config selects the {type(configured).__name__}; remove its checkpoint writer settings:"
                " music2vec checkpoints with DeepSpeed's torch engine and loads without unpickling code"
            )
        self.__dict__.update(configured.__dict__)  # its settings as DeepSpeed configured them; nothing to initialise

    def load(self, path: str, map_location: object = None) -> object:
        try:
            with weights_only_loading():
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
            raise unreadable(path, error) from None
