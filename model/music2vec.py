"""data2vec pretraining: student encoder + regression head, EMA-teacher targets, masked regression loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.encoder import Data2VecAudio
from model.teacher import EMATeacher, ema_decay


def teacher_targets(ffn_outputs: list[Tensor], top_k: int) -> Tensor:
    """Average of the top-k layers' FFN outputs, each instance-normalised over time per channel in fp32.

    (batch, frame, dim) per layer -> (batch, frame, dim) fp32.
    """
    normalised = [F.instance_norm(y.float().transpose(1, 2), eps=1e-5).transpose(1, 2) for y in ffn_outputs[-top_k:]]
    return torch.stack(normalised).mean(dim=0)


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float) -> Tensor:
    """Squared error (smooth L1 if beta > 0) summed over channels, averaged over frames, times `scale`.

    pred, target: (masked_frame, dim).
    """
    if beta == 0:
        per_frame = (pred.float() - target).pow(2).sum(dim=-1)
    else:
        per_frame = F.smooth_l1_loss(pred.float(), target, reduction="none", beta=beta).sum(dim=-1)
    return per_frame.mean() * scale


def channel_std(x: Tensor) -> Tensor:
    """fairseq's `target_var` / `pred_var`: mean over channels of the std over frames. Collapse shows up here first."""
    return torch.sqrt(x.float().var(dim=0) + 1e-6).mean()


class Music2Vec(nn.Module):
    """The module DeepSpeed trains: `forward(audio, mask) -> (loss, metrics)`.

    The EMA teacher is an attribute but not a submodule (see `EMATeacher`), so `state_dict()` holds the student
    alone and checkpoints save `teacher.state_dict()` beside it. The trainer calls `update_teacher` once after every
    optimizer step.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Data2VecAudio(cfg)
        self.final_proj = nn.Linear(cfg.dim, cfg.dim)  # regression head; dropped after pretraining
        self.teacher = EMATeacher(self.encoder.transformer)

    def forward(self, audio: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """audio (batch, sample) normalised waveforms; mask (batch, frame) bool, True where the student is masked."""
        # Through the encoder's own forward, not its parts: ZeRO-3 gathers a module's weights in its forward hooks.
        student = self.encoder(audio, mask)
        pred = self.final_proj(student.last[mask])  # (masked_frame, dim)
        with torch.no_grad():
            target = self._targets(student.features.detach())[mask]
        loss = regression_loss(pred, target, beta=self.cfg.loss_beta, scale=self.cfg.regression_scale)
        metrics = {
            "target_var": channel_std(target),
            "pred_var": channel_std(pred.detach()),
            "masked_fraction": mask.float().mean(),
            "masked_frames": mask.sum(),
        }
        return loss, metrics

    def _targets(self, features: Tensor) -> Tensor:
        """The teacher sees the unmasked features; it runs in the features' precision over its fp32 weights."""
        if self.teacher.device != features.device:
            self.teacher.to(features.device)  # the teacher is not a submodule, so `.to()` on the model skips it
        low_precision = features.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(features.device.type, dtype=features.dtype, enabled=low_precision):
            ffn_outputs = self.teacher.model(features).ffn_outputs
        return teacher_targets(ffn_outputs, self.cfg.average_top_k_layers)

    def compile_blocks(self) -> None:
        """torch.compile the blocks that do the work: the CNN and every transformer layer, of student and teacher.

        Block by block rather than the whole forward: LayerDrop's choice of layers and the selection of masked frames
        (a data-dependent shape) stay in plain Python between compiled blocks, so no update recompiles, and the
        state_dict keys stay as they are.
        """
        self.encoder.feature_extractor.compile()
        for layer in (*self.encoder.transformer.layers, *self.teacher.model.layers):
            layer.compile()

    def update_teacher(self, step: int) -> float:
        """EMA step after the `step`-th optimizer update (step >= 1); returns the decay it used."""
        decay = ema_decay(
            step, start=self.cfg.ema_decay, end=self.cfg.ema_end_decay, anneal_steps=self.cfg.ema_anneal_end_step
        )
        self.teacher.update(self.encoder.transformer, decay)
        return decay
