"""Model configuration, the `base` / `large` / `tiny` presets, and the waveform-to-frame arithmetic."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# (channels, kernel, stride) per CNN layer: 400-sample receptive field, 320-sample hop -> 50 Hz at 16 kHz.
ConvLayers = tuple[tuple[int, int, int], ...]
DATA2VEC_CONV_LAYERS: ConvLayers = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass(frozen=True)
class ModelConfig:
    """data2vec-audio student, teacher targets, loss and EMA. Defaults are data2vec-audio base.

    Trailing comments name the field of fairseq's `Data2VecAudioConfig` each one mirrors.
    """

    # CNN feature extractor and projection
    conv_layers: ConvLayers = DATA2VEC_CONV_LAYERS  # model.conv_feature_layers (extractor_mode: layer_norm)
    # transformer
    dim: int = 768  # model.encoder_embed_dim
    layers: int = 12  # model.encoder_layers
    heads: int = 12  # model.encoder_attention_heads
    ffn_dim: int = 3072  # model.encoder_ffn_embed_dim
    pos_conv_depth: int = 5  # model.pos_conv_depth
    pos_conv_kernel: int = 19  # max(3, model.conv_pos // model.pos_conv_depth) = max(3, 95 // 5)
    pos_conv_groups: int = 16  # model.conv_pos_groups
    layer_norm_eps: float = 1e-5
    # regularisation (pretraining values; the teacher always runs without them)
    dropout: float = 0.1  # model.dropout
    attention_dropout: float = 0.1  # model.attention_dropout
    activation_dropout: float = 0.0  # model.activation_dropout
    layerdrop: float = 0.05  # model.encoder_layerdrop
    # data2vec objective
    average_top_k_layers: int = 8  # model.average_top_k_layers; the paper's ablation compares 8 and 12
    loss_beta: float = 0.0  # model.loss_beta: 0 is squared error, > 0 is smooth L1 with this beta
    loss_scale: float | None = None  # model.loss_scale: None means 1 / sqrt(dim)
    # EMA teacher: decay goes linearly from ema_decay to ema_end_decay over ema_anneal_end_step updates
    ema_decay: float = 0.999  # model.ema_decay
    ema_end_decay: float = 0.9999  # model.ema_end_decay
    ema_anneal_end_step: int = 30_000  # model.ema_anneal_end_step

    def __post_init__(self) -> None:
        # YAML gives lists; the config stays hashable and comparable with tuples.
        object.__setattr__(self, "conv_layers", tuple(tuple(layer) for layer in self.conv_layers))
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def regression_scale(self) -> float:
        return self.loss_scale if self.loss_scale is not None else 1.0 / math.sqrt(self.dim)

    def num_frames(self, num_samples: int) -> int:
        return num_frames(num_samples, self.conv_layers)


def _problems(cfg: ModelConfig) -> list[str]:
    checks = [
        (cfg.dim % cfg.heads == 0, f"dim={cfg.dim} must be divisible by heads={cfg.heads}"),
        (
            cfg.dim % cfg.pos_conv_groups == 0,
            f"dim={cfg.dim} must be divisible by pos_conv_groups={cfg.pos_conv_groups}",
        ),
        (cfg.pos_conv_kernel % 2 == 1, f"pos_conv_kernel={cfg.pos_conv_kernel} must be odd to keep the frame count"),
        (
            1 <= cfg.average_top_k_layers <= cfg.layers,
            f"average_top_k_layers={cfg.average_top_k_layers} must be in [1, layers={cfg.layers}]",
        ),
        (0.0 <= cfg.ema_decay <= cfg.ema_end_decay <= 1.0, "need 0 <= ema_decay <= ema_end_decay <= 1"),
        (cfg.ema_anneal_end_step >= 0, f"ema_anneal_end_step={cfg.ema_anneal_end_step} must be >= 0"),
        (cfg.loss_beta >= 0.0, f"loss_beta={cfg.loss_beta} must be >= 0"),
        (cfg.loss_scale is None or cfg.loss_scale > 0, f"loss_scale={cfg.loss_scale} must be positive or null"),
    ]
    checks += [
        (0.0 <= getattr(cfg, name) < 1.0, f"{name}={getattr(cfg, name)} must be in [0, 1)")
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop")
    ]
    checks += [(all(n > 0 for n in layer), f"conv_layers entry {layer} must be positive") for layer in cfg.conv_layers]
    return [message for ok, message in checks if not ok]


def num_frames(num_samples: int, conv_layers: ConvLayers = DATA2VEC_CONV_LAYERS) -> int:
    """Frames the CNN emits for `num_samples` input samples (0 when the input is shorter than its receptive field).

    5 s at 16 kHz -> 249 frames, 30 s -> 1499.
    """
    frames = num_samples
    for _, kernel, stride in conv_layers:
        frames = (frames - kernel) // stride + 1
        if frames <= 0:
            return 0
    return frames


# The MERT-330M size class: 24 layers x 1024, 16 heads.
_LARGE = {"dim": 1024, "layers": 24, "heads": 16, "ffn_dim": 4096}
# Fast CPU tests and the demo: same CNN strides (so the same 50 Hz frames), narrow and shallow everywhere else.
_TINY = {
    "conv_layers": tuple((32, kernel, stride) for _, kernel, stride in DATA2VEC_CONV_LAYERS),
    "dim": 64,
    "layers": 4,
    "heads": 4,
    "ffn_dim": 128,
    "pos_conv_depth": 2,
    "pos_conv_kernel": 9,
    "average_top_k_layers": 2,
}
PRESETS: dict[str, dict[str, object]] = {"base": {}, "large": _LARGE, "tiny": _TINY}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named preset, with any field overridden (`preset("base", average_top_k_layers=12)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}")
    return ModelConfig(**{**PRESETS[name], **overrides})
