"""Experiment configuration: one dataclass per package composed into `ExperimentConfig`, loaded from YAML + overrides.

A YAML under configs/ is a short diff against the defaults in code. `model.preset` picks the architecture preset
that the other `model.*` keys then override. Unknown keys and values of the wrong type are refused by OmegaConf with
the key's full name; values out of range are refused by each dataclass's own checks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import PRESETS, ModelConfig, preset
from trainer.layout import CONFIG

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the tri-stage schedule of data2vec-audio base (fairseq `optimization` / `lr_scheduler`)."""

    lr: float = 5e-4  # optimization.lr: the peak
    betas: tuple[float, float] = (0.9, 0.98)  # optimizer.adam_betas
    eps: float = 1e-6  # optimizer.adam_eps
    weight_decay: float = 0.01  # optimizer.weight_decay, on every parameter as in fairseq
    max_updates: int = 400_000  # optimization.max_update
    phase_ratio: tuple[float, float, float] = (0.03, 0.9, 0.07)  # lr_scheduler.phase_ratio: warm-up, hold, decay
    init_lr_scale: float = 0.01  # lr_scheduler.init_lr_scale
    final_lr_scale: float = 0.01  # lr_scheduler.final_lr_scale
    clip_norm: float = 0.0  # optimization.clip_norm: 0 disables clipping, as in the reference recipe

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"optim.lr={self.lr} must be positive"),
            (self.max_updates >= 1, f"optim.max_updates={self.max_updates} must be >= 1"),
            (
                math.isclose(sum(self.phase_ratio), 1.0) and min(self.phase_ratio) >= 0,
                f"optim.phase_ratio={list(self.phase_ratio)} must be three non-negative fractions summing to 1",
            ),
            (0 < self.init_lr_scale <= 1 and 0 < self.final_lr_scale <= 1, "optim lr scales must be in (0, 1]"),
            (self.clip_norm >= 0, f"optim.clip_norm={self.clip_norm} must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), f"optim.betas={list(self.betas)} must be in [0, 1)"),
        ]
        _refuse([message for ok, message in checks if not ok])


COMPILE_NEEDS_ZERO_1_OR_2 = (
    "train.compile needs train.zero_stage 1 or 2: ZeRO-3 gathers and frees each layer's weights around its forward,"
    " and the compiled layers recompile until torch gives up and runs them uncompiled"
)


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it writes, how big a step is, precision and ZeRO, logging, checkpoints and guards."""

    run_dir: str = "runs/music2vec"
    grad_accum: int = 1  # micro-batches per optimizer step (data.batch_size crops each, on every rank)
    precision: Precision = "bf16"
    zero_stage: int = 2
    offload: bool = False  # ZeRO optimizer state in CPU memory
    ds_config: str = ""  # a DeepSpeed JSON to start from; empty: ds_configs/zero{stage}[_offload].json
    seed: int = 1  # fairseq's default
    compile: bool = False  # torch.compile the repeated blocks of student and teacher; needs a C compiler (Triton)
    deterministic: bool = False  # deterministic GPU kernels, so resume is bitwise on GPUs too; slower (PERFORMANCE.md)
    log_every: int = 50
    checkpoint_every: int = 5_000
    keep_last: int = 3  # the newest checkpoints kept ...
    keep_every: int = 25_000  # ... and every one at a multiple of this, permanently (0: none)
    max_nonfinite: int = 20  # consecutive steps with a non-finite loss before the run aborts
    min_target_var: float = 0.1  # collapse (docs/ALGORITHM.md §5) when target_var falls below this ...
    collapse_check_after: int = 5_000  # ... once this many updates are done
    collective_timeout_s: int = 600  # a rank that waits this long for the others ends the run (a rank died or hung)
    shared_group: bool = False  # the run directory may be written by its group (a project folder); never by others

    def __post_init__(self) -> None:
        checks = [
            (self.grad_accum >= 1, f"train.grad_accum={self.grad_accum} must be >= 1"),
            (self.zero_stage in (1, 2, 3), f"train.zero_stage={self.zero_stage} must be 1, 2 or 3"),
            (not self.offload or self.zero_stage in (2, 3), "train.offload needs train.zero_stage 2 or 3"),
            (not self.compile or self.zero_stage in (1, 2), COMPILE_NEEDS_ZERO_1_OR_2),
            (self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1"),
            (self.checkpoint_every >= 1, f"train.checkpoint_every={self.checkpoint_every} must be >= 1"),
            (self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1"),
            (self.keep_every >= 0, f"train.keep_every={self.keep_every} must be >= 0"),
            (self.max_nonfinite >= 1, f"train.max_nonfinite={self.max_nonfinite} must be >= 1"),
            (self.collective_timeout_s >= 1, f"train.collective_timeout_s={self.collective_timeout_s} must be >= 1"),
        ]
        _refuse([message for ok, message in checks if not ok])


# What a run's numbers do not depend on: where its directory is and who may write it, how often it logs and
# checkpoints, how many checkpoints it keeps, when its guards give up, and which kernels compute the same math. A run
# continues across a change of these; the config digest leaves them out. Nor does it hold the layout (loader workers,
# and the micro-batches per update that make the global batch with the world size): a resume in another layout is
# elastic, and the global batch is checked on its own (trainer.elastic).
NOT_IN_DIGEST = {
    "data": ("workers",),
    "train": (
        "run_dir",
        "grad_accum",
        "log_every",
        "checkpoint_every",
        "keep_last",
        "keep_every",
        "max_nonfinite",
        "min_target_var",
        "collapse_check_after",
        "collective_timeout_s",
        "shared_group",
        "compile",
        "deterministic",
    ),
}


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as in YAML

    def digest(self) -> str:
        """Identifies what a run computes (not where it lives or how it reports, see NOT_IN_DIGEST); checkpoints
        carry it so a run directory is never resumed with another computation."""
        computation = self.to_dict()
        for section, keys in NOT_IN_DIGEST.items():
            for key in keys:
                del computation[section][key]
        return hashlib.sha256(json.dumps(computation, sort_keys=True).encode()).hexdigest()[:16]


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults, then the YAML at `path`, then `key=value` overrides; validated into an `ExperimentConfig`."""
    layers = read_layers(path, overrides)
    with config_errors(str(path) if path else "defaults"):
        return experiment_config(layers)


def read_layers(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> list[DictConfig]:
    """The YAML (if any) and the overrides, unvalidated: a launcher may take its own section out first."""
    source = str(path) if path else "defaults"
    with config_errors(source):
        layers = [_mapping(OmegaConf.load(path))] if path else []
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        return layers


def experiment_config(layers: list[DictConfig]) -> ExperimentConfig:
    """Layers merged over the defaults (of `model.preset`'s architecture); call inside `config_errors`."""
    preset_name = _pop_preset(layers)
    schema = OmegaConf.structured(ExperimentConfig(model=preset(preset_name)))
    return OmegaConf.to_object(OmegaConf.merge(schema, *layers))


@contextmanager
def config_errors(source: str) -> Iterator[None]:
    """Turns every way a config can be wrong into one ValueError (or FileNotFoundError) that names `source`."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no such config file") from None
    except OmegaConfBaseException as error:
        raise ValueError(f"{source}: {_first_line(error)}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{source}: {error}") from None


def _mapping(layer: Any) -> DictConfig:
    if not isinstance(layer, DictConfig):
        raise TypeError("expected a mapping of sections (model, data, optim, train)")
    return layer


def _pop_preset(layers: list[DictConfig]) -> str:
    """The last `model.preset` given (YAML, then overrides), removed from the layers: it is not a model field."""
    name = "base"
    for layer in layers:
        model = layer.get("model")
        if isinstance(model, DictConfig) and "preset" in model:
            name = str(model.pop("preset"))
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is not one of {sorted(PRESETS)}")
    return name


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] + _full_key(error)


def _full_key(error: Exception) -> str:
    key = getattr(error, "full_key", None)
    return f" (key: {key})" if key else ""


def check_run_dir(cfg: ExperimentConfig, run_dir: Path, *, allow_config_change: bool) -> None:
    """Refuse a run directory that ran another config, unless allowed (a launcher checks before submitting)."""
    saved = run_dir / CONFIG
    if saved.is_file() and not allow_config_change:
        previous = load_config(saved)
        if previous.digest() != cfg.digest():
            raise ValueError(
                f"{saved} holds another config (digest {previous.digest()} vs {cfg.digest()}); use a new"
                " train.run_dir, or pass --allow-config-change to continue this run with the new one"
            )


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict())))
