"""The probe head and its training (spec §8.2, MARBLE's defaults): learnable softmax weights over hidden states
1-12, then Linear → ReLU → Dropout(0.2) → Linear; Adam, batch 64, at most 100 epochs, ReduceLROnPlateau and
early stopping on the task's validation metric; every window is an example, and windows are averaged per song
before scoring.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from probes.features import Features
from probes.metrics import score
from probes.tasks import Example, Task


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 512
    dropout: float = 0.2
    batch_size: int = 64
    max_epochs: int = 100
    lr: float | None = None  # None: the task's learning rate
    standardize: bool = False  # JukeMIR's option: each (layer, dim) scaled with the training split's statistics


class LayerWeightedMLP(nn.Module):
    def __init__(self, layers: int, dim: int, outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.layer_logits = nn.Parameter(torch.randn(layers))
        self.mlp = nn.Sequential(
            nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, outputs)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (batch, layer, dim) -> (batch, outputs)
        weights = torch.softmax(self.layer_logits, dim=0)
        return self.mlp(torch.einsum("l,bld->bd", weights, features))

    def layer_weights(self) -> list[float]:
        return torch.softmax(self.layer_logits.detach(), dim=0).tolist()


@dataclass
class ProbeResult:
    test: dict[str, float]
    valid: dict[str, float]
    epochs: int
    layer_weights: list[float]


def train_probe(task: Task, examples: list[Example], features: Features, *, seed: int, cfg: HeadConfig) -> ProbeResult:
    torch.manual_seed(seed)
    windows = {split: _windows_of(examples, features, split) for split in ("train", "valid", "test")}
    if cfg.standardize:
        train = features.values[windows["train"]]
        features = Features((features.values - train.mean(dim=0)) / train.std(dim=0).clamp_min(1e-6), features.example)
    inputs = features.values[:, 1:]  # hidden states 1..L; the transformer's input (index 0) is left out
    head = LayerWeightedMLP(inputs.shape[1], inputs.shape[2], task.outputs, cfg)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr or task.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=task.plateau_patience
    )
    targets = _targets(task, examples, features)
    # regression targets are standardised with the training split's statistics (JukeMIR); R² does not change
    shift, spread = _standardisation(task, targets[windows["train"]])
    if task.kind == "regression":
        targets = (targets - shift) / spread
    loss_fn = _loss(task)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, since_best, epochs = -np.inf, copy.deepcopy(head.state_dict()), 0, 0
    for epochs in range(1, cfg.max_epochs + 1):  # noqa: B007 - the count is reported
        head.train()
        order = windows["train"][torch.randperm(len(windows["train"]), generator=generator)]
        for batch in order.split(cfg.batch_size):
            optimizer.zero_grad()
            loss_fn(head(inputs[batch]), targets[batch]).backward()
            optimizer.step()
        valid = evaluate(task, head, examples, features, "valid", unscale=(shift, spread))[task.monitor]
        plateau.step(valid)
        if valid > best:
            best, best_state, since_best = valid, copy.deepcopy(head.state_dict()), 0
        else:
            since_best += 1
            if since_best >= task.stop_patience:
                break
    head.load_state_dict(best_state)
    return ProbeResult(
        test=evaluate(task, head, examples, features, "test", unscale=(shift, spread)),
        valid=evaluate(task, head, examples, features, "valid", unscale=(shift, spread)),
        epochs=epochs,
        layer_weights=head.layer_weights(),
    )


@torch.inference_mode()
def evaluate(
    task: Task,
    head: nn.Module,
    examples: list[Example],
    features: Features,
    split: str,
    *,
    unscale: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """Window outputs averaged per song (logits for classes and tags, values for regression), then scored."""
    head.eval()
    chosen = _windows_of(examples, features, split)
    outputs = head(features.values[chosen, 1:]) * unscale[1] + unscale[0]
    songs = [examples[int(features.example[w])].song_id for w in chosen]
    names = sorted(set(songs))
    index = torch.tensor([names.index(song) for song in songs])
    summed = torch.zeros(len(names), outputs.shape[1]).index_add_(0, index, outputs)
    counts = torch.zeros(len(names)).index_add_(0, index, torch.ones(len(songs)))
    per_song = (summed / counts[:, None]).numpy()
    first = {song: examples[int(features.example[w])] for w, song in zip(chosen.tolist(), songs, strict=True)}
    return score(task, per_song, np.stack([_target_array(task, first[name].target) for name in names]))


def _windows_of(examples: list[Example], features: Features, split: str) -> torch.Tensor:
    in_split = torch.tensor([example.split == split for example in examples])
    chosen = torch.nonzero(in_split[features.example]).flatten()
    if len(chosen) == 0:
        raise ValueError(f"no {split} examples with features")
    return chosen


def _target_array(task: Task, target: int | tuple) -> np.ndarray:
    if task.kind == "multiclass":
        return np.asarray(target)
    if task.kind == "multilabel":
        tags = np.zeros(task.outputs, dtype=np.float32)
        tags[list(target)] = 1
        return tags
    return np.asarray(target, dtype=np.float32)


def _targets(task: Task, examples: list[Example], features: Features) -> torch.Tensor:
    rows = np.stack([_target_array(task, examples[int(owner)].target) for owner in features.example])
    return torch.from_numpy(rows).long() if task.kind == "multiclass" else torch.from_numpy(rows).float()


def _standardisation(task: Task, train_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if task.kind != "regression":
        return torch.tensor(0.0), torch.tensor(1.0)
    return train_targets.mean(dim=0), train_targets.std(dim=0).clamp_min(1e-6)


def _loss(task: Task) -> nn.Module:
    if task.kind == "multiclass":
        return nn.CrossEntropyLoss()
    return nn.BCEWithLogitsLoss() if task.kind == "multilabel" else nn.MSELoss()
