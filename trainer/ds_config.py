"""DeepSpeed configuration: a template from ds_configs/ with the values the experiment config owns filled in.

The experiment config is the single source of the batch arithmetic, precision, ZeRO stage, offload and clipping.
In a template those keys are "auto" (or absent); a template that sets one of them by hand to anything else is
refused, naming the file and key, rather than silently overridden. The optimizer and LR schedule are built by the
trainer from `optim.*`, so a template must not define them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.config import ExperimentConfig

TEMPLATES = Path(__file__).resolve().parents[1] / "ds_configs"
AUTO = "auto"


def template_path(cfg: ExperimentConfig) -> Path:
    if cfg.train.ds_config:
        return Path(cfg.train.ds_config)
    return TEMPLATES / f"zero{cfg.train.zero_stage}{'_offload' if cfg.train.offload else ''}.json"


def owned_values(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """Dotted DeepSpeed keys and the values the experiment config gives them."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_norm,
        "bf16.enabled": cfg.train.precision == "bf16",
        "fp16.enabled": cfg.train.precision == "fp16",
        "zero_optimization.stage": cfg.train.zero_stage,
        "zero_optimization.offload_optimizer.device": "cpu" if cfg.train.offload else "none",
    }


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The resolved DeepSpeed config for `world_size` ranks."""
    path = template_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DeepSpeed config template (train.ds_config / train.zero_stage)")
    try:
        resolved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            raise ValueError(
                f"{path}: remove {section!r}: the trainer builds AdamW and the tri-stage schedule from optim.*"
            )
    for dotted, value in owned_values(cfg, world_size).items():
        _fill(resolved, dotted, value, path)
    return resolved


def _fill(config: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, AUTO)
    if current not in (AUTO, value):
        raise ValueError(
            f"{path}: {dotted}={current!r} contradicts the experiment config, which gives {value!r};"
            ' set it to "auto" and change the experiment config instead'
        )
    node[leaf] = value
