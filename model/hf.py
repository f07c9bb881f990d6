"""Conversion to and from Hugging Face `Data2VecAudioModel` weights and folders (config.json + model.safetensors).

Writing and reading a folder needs no `transformers` import: the config is plain JSON and the weights safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import ModelConfig
from model.encoder import Data2VecAudio

# (ours, Hugging Face) name prefixes; `{}` stands for a layer index. Everything after the prefix is kept.
_PREFIXES = [
    ("feature_extractor.blocks.{}.weight", "feature_extractor.conv_layers.{}.conv.weight"),
    ("feature_extractor.blocks.{}.norm.", "feature_extractor.conv_layers.{}.layer_norm."),
    ("feature_projection.norm.", "feature_projection.layer_norm."),
    ("feature_projection.proj.", "feature_projection.projection."),
    ("mask_emb", "masked_spec_embed"),
    ("transformer.pos_conv.blocks.{}.conv.", "encoder.pos_conv_embed.layers.{}.conv."),
    ("transformer.norm.", "encoder.layer_norm."),
    ("transformer.layers.{}.attn.q_proj.", "encoder.layers.{}.attention.q_proj."),
    ("transformer.layers.{}.attn.k_proj.", "encoder.layers.{}.attention.k_proj."),
    ("transformer.layers.{}.attn.v_proj.", "encoder.layers.{}.attention.v_proj."),
    ("transformer.layers.{}.attn.out_proj.", "encoder.layers.{}.attention.out_proj."),
    ("transformer.layers.{}.attn_norm.", "encoder.layers.{}.layer_norm."),
    ("transformer.layers.{}.fc1.", "encoder.layers.{}.feed_forward.intermediate_dense."),
    ("transformer.layers.{}.fc2.", "encoder.layers.{}.feed_forward.output_dense."),
    ("transformer.layers.{}.ffn_norm.", "encoder.layers.{}.final_layer_norm."),
]
_QKV = re.compile(r"(transformer\.layers\.\d+\.attn\.)qkv\.(weight|bias)")
_SPLIT_QKV = re.compile(r"(transformer\.layers\.\d+\.attn\.)([qkv])_proj\.(weight|bias)")

# Fields of our ModelConfig that Hugging Face's config has no place for; kept under this key in config.json.
_PRETRAINING_KEY = "music2vec"
_PRETRAINING_FIELDS = (
    "average_top_k_layers",
    "loss_beta",
    "loss_scale",
    "ema_decay",
    "ema_end_decay",
    "ema_anneal_end_step",
)
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"  # how m-a-p/music2vec-v1 itself is stored


def _rename(name: str, pairs: list[tuple[str, str]]) -> str | None:
    for source, target in pairs:
        pattern = re.escape(source).replace(r"\{\}", r"(\d+)") + "(.*)"
        match = re.fullmatch(pattern, name)
        if match:
            *indices, rest = match.groups()
            return target.format(*indices) + rest
    return None


def to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our `Data2VecAudio` state dict -> `Data2VecAudioModel` state dict (the fused q/k/v is split in three)."""
    split: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = _QKV.fullmatch(name)
        if match:
            prefix, kind = match.groups()
            for letter, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                split[f"{prefix}{letter}_proj.{kind}"] = part.clone()  # clone: safetensors refuses shared storage
        else:
            split[name] = tensor
    converted = {}
    for name, tensor in split.items():
        hf_name = _rename(name, _PREFIXES)
        if hf_name is None:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        converted[hf_name] = tensor
    return converted


def from_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`Data2VecAudioModel` state dict -> our `Data2VecAudio` state dict (q/k/v fused)."""
    reverse = [(hf, ours) for ours, hf in _PREFIXES]
    renamed, unknown = {}, []
    for name, tensor in state.items():
        ours = _rename(name, reverse)
        if ours is None:
            unknown.append(name)
        else:
            renamed[ours] = tensor
    if unknown:
        raise KeyError(f"weights this encoder does not have: {sorted(unknown)[:8]} (a Data2VecAudioModel expected)")
    fused: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in renamed.items():
        match = _SPLIT_QKV.fullmatch(name)
        if match:
            prefix, letter, kind = match.groups()
            parts.setdefault((prefix, kind), {})[letter] = tensor
        else:
            fused[name] = tensor
    for (prefix, kind), qkv in parts.items():
        fused[f"{prefix}qkv.{kind}"] = torch.cat([qkv[letter] for letter in "qkv"], dim=0)
    return fused


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A `Data2VecAudioConfig` dict describing this encoder, plus our pretraining fields under "music2vec"."""
    channels, kernels, strides = (list(column) for column in zip(*cfg.conv_layers, strict=True))
    return {
        "architectures": ["Data2VecAudioModel"],
        "model_type": "data2vec-audio",
        "torch_dtype": "float32",
        "conv_dim": channels,
        "conv_kernel": kernels,
        "conv_stride": strides,
        "conv_bias": False,
        "num_feat_extract_layers": len(channels),
        "feat_extract_activation": "gelu",
        "hidden_act": "gelu",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn_dim,
        "num_conv_pos_embeddings": cfg.pos_conv_depth,
        "conv_pos_kernel_size": cfg.pos_conv_kernel,
        "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "layerdrop": cfg.layerdrop,
        "feat_proj_dropout": 0.0,
        "mask_time_prob": 0.05,  # Hugging Face only creates `masked_spec_embed` when this is > 0
        "add_adapter": False,
        _PRETRAINING_KEY: {name: getattr(cfg, name) for name in _PRETRAINING_FIELDS},
    }


# What our encoder implements; a config asking for anything else is refused rather than loaded wrongly.
_REQUIRED_HF_VALUES = {
    "model_type": "data2vec-audio",
    "conv_bias": False,
    "feat_extract_activation": "gelu",
    "hidden_act": "gelu",
    "add_adapter": False,
}


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config") -> ModelConfig:
    """The `ModelConfig` of a `Data2VecAudioConfig` dict; `source` names the file in error messages."""
    for key, value in _REQUIRED_HF_VALUES.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {value!r})")
    try:
        conv_layers = tuple(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"], strict=True))
        fields = {
            "conv_layers": tuple(tuple(int(v) for v in layer) for layer in conv_layers),
            "dim": hf["hidden_size"],
            "layers": hf["num_hidden_layers"],
            "heads": hf["num_attention_heads"],
            "ffn_dim": hf["intermediate_size"],
            "pos_conv_depth": hf["num_conv_pos_embeddings"],
            "pos_conv_kernel": hf["conv_pos_kernel_size"],
            "pos_conv_groups": hf["num_conv_pos_embedding_groups"],
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-5),
            "dropout": hf.get("hidden_dropout", 0.1),
            "attention_dropout": hf.get("attention_dropout", 0.1),
            "activation_dropout": hf.get("activation_dropout", 0.1),
            "layerdrop": hf.get("layerdrop", 0.1),
        }
    except KeyError as missing:
        raise ValueError(f"{source}: missing key {missing.args[0]!r} of a Data2VecAudioConfig") from None
    except ValueError:
        raise ValueError(f"{source}: conv_dim, conv_kernel and conv_stride must have the same length") from None
    pretraining = dict(hf.get(_PRETRAINING_KEY, {}))
    unknown = sorted(set(pretraining) - set(_PRETRAINING_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} under {_PRETRAINING_KEY!r}")
    # A foreign config has no pretraining fields; a shallow encoder cannot average more layers than it has.
    pretraining.setdefault("average_top_k_layers", min(ModelConfig.average_top_k_layers, fields["layers"]))
    return ModelConfig(**fields, **pretraining)


def save_hf(encoder: Data2VecAudio, folder: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` that `Data2VecAudioModel.from_pretrained(folder)` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    save_file(to_hf_state_dict(state), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(encoder.cfg), indent=2) + "\n")
    return folder


def load_hf(folder: str | Path) -> Data2VecAudio:
    """Our encoder from a Hugging Face `Data2VecAudioModel` folder (ours, m-a-p/music2vec-v1, or any other)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json; expected a Hugging Face Data2VecAudioModel folder")
    cfg = config_from_hf(json.loads(config_path.read_text()), source=str(config_path))
    encoder = Data2VecAudio(cfg)
    encoder.load_state_dict(from_hf_state_dict(_read_weights(folder)))
    return encoder


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME)
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        # weights_only: a pickled checkpoint from elsewhere must not be able to run code
        return torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} found")
