"""The data2vec-audio encoder: CNN feature extractor, feature projection, positional conv, post-LN transformer.

Read top to bottom: small blocks first, `Data2VecAudio` (what Hugging Face publishes as `Data2VecAudioModel`) last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


class ConvBlock(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels at each time step -> GELU, on channels-last activations.

    The convolution is a matmul over unfolded windows, so activations stay (batch, time, channel) through the whole
    CNN and LayerNorm and GELU need no transposes. The first layers run at 3.2 kHz on 512 channels, and transposing
    those activations dominated the CNN's time (bench/model_step.py).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel))  # nn.Conv1d's layout
        # fairseq uses an Fp32LayerNorm here; PyTorch's kernels already compute bf16/fp16 statistics in fp32, and
        # casting the largest activations of the network up and back down would cost two passes over them.
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        windows = x.unfold(1, self.kernel, self.stride)  # (batch, frame, channel, kernel), a view
        x = F.linear(windows.flatten(2), self.weight.flatten(1))  # (batch, frame, out_channel)
        return F.gelu(self.norm(x))


class FeatureExtractor(nn.Module):
    """Seven strided convolutions: 16 kHz waveform -> 50 Hz frames."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        in_channels = [1] + [channels for channels, _, _ in cfg.conv_layers[:-1]]
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, kernel, stride)
            for c_in, (c_out, kernel, stride) in zip(in_channels, cfg.conv_layers, strict=True)
        )

    def forward(self, audio: Tensor) -> Tensor:
        x = audio.unsqueeze(-1)  # (batch, sample, 1)
        for block in self.blocks:
            x = block(x)
        return x  # (batch, frame, channel)


class FeatureProjection(nn.Module):
    """LayerNorm over CNN channels, then a linear map to the transformer width."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.conv_dim, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.conv_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class PositionalConvBlock(nn.Module):
    """Grouped Conv1d ('same' length for an odd kernel) -> LayerNorm without affine -> GELU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        kernel = cfg.pos_conv_kernel
        self.conv = nn.Conv1d(cfg.dim, cfg.dim, kernel, padding=kernel // 2, groups=cfg.pos_conv_groups)
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # (batch, dim, frame)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class PositionalConv(nn.Module):
    """A chain of positional conv blocks; its output is added to the frames it was computed from."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PositionalConvBlock(cfg) for _ in range(cfg.pos_conv_depth))

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # (batch, dim, frame)
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and PyTorch's SDPA kernels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # rows: q, then k, then v
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, frames, dim = x.shape
        qkv = self.qkv(x).view(batch, frames, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, head, frame, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, frames, dim)
        return self.out_proj(y)


class TransformerLayer(nn.Module):
    """Post-LN layer. Also returns the FFN output before dropout and residual: data2vec's teacher target."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.attn_norm(x + self.dropout(self.attn(x)))
        ffn = self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))
        x = self.ffn_norm(x + self.dropout(ffn))
        return x, ffn


@dataclass
class TransformerOutput:
    last: Tensor  # (batch, frame, dim): output of the top layer
    hidden_states: list[Tensor]  # the top layer's input after positional conv + LayerNorm, then every layer's output
    ffn_outputs: list[Tensor]  # the FFN output of every layer that ran (all of them unless LayerDrop skipped some)


@dataclass
class EncoderOutput(TransformerOutput):
    features: Tensor  # (batch, frame, dim): the transformer's input before masking, what the EMA teacher sees


class Transformer(nn.Module):
    """Positional conv, LayerNorm, dropout, then the layer stack with LayerDrop. The part the EMA teacher copies."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pos_conv = PositionalConv(cfg)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        self.layerdrop = cfg.layerdrop

    def forward(self, x: Tensor) -> TransformerOutput:
        x = self.dropout(self.norm(x + self.pos_conv(x)))
        hidden_states, ffn_outputs = [x], []
        for layer, runs in zip(self.layers, self._layers_that_run(), strict=True):
            if runs:
                x, ffn = layer(x)
                ffn_outputs.append(ffn)
            hidden_states.append(x)
        return TransformerOutput(x, hidden_states, ffn_outputs)

    def _layers_that_run(self) -> list[bool]:
        if not (self.training and self.layerdrop > 0):
            return [True] * len(self.layers)
        # One draw per layer per forward from torch's default CPU generator, never the CUDA one: the trainer seeds it
        # identically on every rank and checkpoints it, so all ranks skip the same layers (ZeRO-3 gathers each
        # layer's weights collectively and would hang otherwise) and a resumed run makes the same draws.
        return (torch.rand(len(self.layers)) >= self.layerdrop).tolist()


class Data2VecAudio(nn.Module):
    """The encoder Hugging Face publishes as `Data2VecAudioModel` (m-a-p/music2vec-v1), with its mask embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.mask_emb = nn.Parameter(torch.empty(cfg.dim))
        self.transformer = Transformer(cfg)
        self.reset_parameters()

    def features(self, audio: Tensor) -> Tensor:
        """(batch, sample) waveform -> (batch, frame, dim) projected CNN features: the transformer's input."""
        return self.feature_projection(self.feature_extractor(audio))

    def apply_mask(self, features: Tensor, mask: Tensor) -> Tensor:
        """Replace (not add to) the features of masked frames with the learned mask embedding."""
        return torch.where(mask.unsqueeze(-1), self.mask_emb.to(features.dtype), features)

    def forward(self, audio: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        features = self.features(audio)
        x = features if mask is None else self.apply_mask(features, mask)
        out = self.transformer(x)
        return EncoderOutput(out.last, out.hidden_states, out.ffn_outputs, features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """data2vec's init: BERT init for the transformer's linears, Kaiming for the CNN, torch defaults elsewhere."""
        for module in self.transformer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(mean=0.0, std=0.02)
                module.bias.zero_()
        for block in self.feature_extractor.blocks:
            nn.init.kaiming_normal_(block.weight)
        self.mask_emb.uniform_()
