"""The probe head and its training (MARBLE's defaults, docs/ALGORITHM.md §10.2): learnable softmax weights over
hidden states 1-12, then Linear → ReLU → Dropout(0.2) → Linear; Adam, batch 64, at most 100 epochs,
ReduceLROnPlateau and early stopping on the task's validation metric; every window is an example, and windows are
averaged per song before scoring.

Options: one fixed hidden state instead of the learned weights (a layer-wise curve), a linear head, and the
knobs of JukeMIR's grid (§10.1): input dropout, L2 weight decay, feature standardisation, batch size. JukeMIR's
protocol trains differently (`fit_jukemir`): batches drawn at random, the validation score every 8 steps, patience
of 256 evaluations.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from probes.features import Features
from probes.metrics import score
from probes.tasks import Example, Protocol, Task

JUKEMIR_EVALUATE_EVERY = 8  # steps
JUKEMIR_PATIENCE = 256  # evaluations without a better validation score
JUKEMIR_MAX_STEPS = 200_000  # this project's guard: a head whose validation score keeps creeping up stops here


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 512  # 0: a linear head
    dropout: float = 0.2  # after the hidden layer
    input_dropout: float = 0.0  # JukeMIR drops features at the input too, with the same p
    weight_decay: float = 0.0  # Adam's L2 penalty (JukeMIR's grid)
    batch_size: int = 64
    max_epochs: int = 100
    lr: float | None = None  # None: the task's learning rate
    standardize: bool = False  # JukeMIR's option: each (layer, dim) scaled with the training split's statistics
    layer: int | None = None  # one hidden state (0: the transformer's input); None: learned weights over 1..L


class LayerWeightedMLP(nn.Module):
    """Softmax weights over the given hidden states, then an MLP (or a linear map when `hidden` is 0)."""

    def __init__(self, layers: int, dim: int, outputs: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.layer_logits = nn.Parameter(torch.randn(layers))
        hidden = [nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout)] if cfg.hidden else []
        self.mlp = nn.Sequential(nn.Dropout(cfg.input_dropout), *hidden, nn.Linear(cfg.hidden or dim, outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (batch, layer, dim) -> (batch, outputs)
        weights = torch.softmax(self.layer_logits, dim=0)  # a single given layer gets weight 1
        return self.mlp(torch.einsum("l,bld->bd", weights, features))

    def layer_weights(self) -> list[float]:
        return torch.softmax(self.layer_logits.detach(), dim=0).tolist()


@dataclass
class ProbeResult:
    test: dict[str, float]
    valid: dict[str, float]
    epochs: int
    layer_weights: list[float]
    ensemble: str  # how window outputs became song outputs (chosen on valid when the task allows several)
    steps: int  # optimizer steps


# A song's outputs from its windows': the mean (logits, tag logits or values), or for classes JukeMIR's others:
# a majority vote of window predictions, the elementwise max logit, the mean of window softmaxes.
SONG_ENSEMBLES = ("mean", "vote", "max_logit", "mean_softmax")


def train_probe(
    task: Task,
    examples: list[Example],
    features: Features,
    *,
    seed: int,
    cfg: HeadConfig,
    protocol: Protocol = "marble",
) -> ProbeResult:
    """A head fitted on the training windows (MARBLE's epochs, or JukeMIR's random batches), with the song ensemble
    best on valid; scored on valid and test."""
    torch.manual_seed(seed)
    inputs = probe_inputs(task, examples, features, cfg)
    head = LayerWeightedMLP(inputs.values.shape[1], inputs.values.shape[2], task.outputs, cfg)
    scores = functools.partial(evaluate, task, head, examples, inputs)

    def best_ensemble() -> tuple[str, dict[str, float]]:  # MARBLE monitors the best ensemble's validation score
        by_ensemble = {ensemble: scores(split="valid", ensemble=ensemble) for ensemble in task.song_ensembles}
        return max(by_ensemble.items(), key=lambda item: item[1][task.monitor])

    def validate() -> float:
        return best_ensemble()[1][task.monitor]

    if protocol == "jukemir":
        epochs, steps = 0, fit_jukemir(head, task, inputs, cfg, seed=seed, validate=validate)
    else:
        epochs = fit(head, task, inputs, cfg, seed=seed, validate=validate)
        steps = epochs * -(-len(inputs.windows["train"]) // cfg.batch_size)
    ensemble, valid_scores = best_ensemble()
    return ProbeResult(
        test=scores(split="test", ensemble=ensemble),
        valid=valid_scores,
        epochs=epochs,
        layer_weights=head.layer_weights(),
        ensemble=ensemble,
        steps=steps,
    )


@dataclass(frozen=True)
class ProbeInputs:
    """What a head trains on and is scored on, one row per window."""

    values: torch.Tensor  # (window, layer, dim): the hidden states the head sees
    targets: torch.Tensor  # class, tag or value targets; values standardised with the training split's statistics
    owners: torch.Tensor  # (window,): the example each window comes from
    windows: dict[str, torch.Tensor]  # split -> its windows
    unscale: tuple[torch.Tensor, torch.Tensor]  # (shift, spread): head outputs back to the targets' units


def probe_inputs(task: Task, examples: list[Example], features: Features, cfg: HeadConfig) -> ProbeInputs:
    """The windows of each split, their features (standardised per layer and dimension with the training split's
    statistics when `cfg.standardize`, JukeMIR's option), the hidden states the head sees, and the targets."""
    windows = {split: _windows_of(examples, features.example, split) for split in ("train", "valid", "test")}
    values = features.values
    if cfg.standardize:
        train = values[windows["train"]]
        values = (values - train.mean(dim=0)) / train.std(dim=0).clamp_min(1e-6)
    targets = _targets(task, examples, features)
    # regression targets are standardised with the training split's statistics (JukeMIR); R² does not change
    shift, spread = _standardisation(task, targets[windows["train"]])
    if task.kind == "regression":
        targets = (targets - shift) / spread
    return ProbeInputs(head_inputs(values, cfg), targets, features.example, windows, (shift, spread))


def fit(
    head: LayerWeightedMLP,
    task: Task,
    inputs: ProbeInputs,
    cfg: HeadConfig,
    *,
    seed: int,
    validate: Callable[[], float],
) -> int:
    """Adam on the training windows, ReduceLROnPlateau and early stopping on `validate()` (higher is better); the
    head keeps the weights of its best epoch. Returns the epochs run."""
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr or task.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=task.plateau_patience
    )
    loss_fn = _loss(task)
    generator = torch.Generator().manual_seed(seed)
    train = inputs.windows["train"]
    best, best_state, since_best, epochs = -np.inf, copy.deepcopy(head.state_dict()), 0, 0
    for epochs in range(1, cfg.max_epochs + 1):  # noqa: B007 - the count is reported
        head.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(cfg.batch_size):
            optimizer.zero_grad()
            loss_fn(head(inputs.values[batch]), inputs.targets[batch]).backward()
            optimizer.step()
        valid = validate()
        plateau.step(valid)
        if valid > best:
            best, best_state, since_best = valid, copy.deepcopy(head.state_dict()), 0
        else:
            since_best += 1
            if since_best >= task.stop_patience:
                break
    head.load_state_dict(best_state)
    return epochs


def fit_jukemir(
    head: LayerWeightedMLP,
    task: Task,
    inputs: ProbeInputs,
    cfg: HeadConfig,
    *,
    seed: int,
    validate: Callable[[], float],
    evaluate_every: int = JUKEMIR_EVALUATE_EVERY,
    patience: int = JUKEMIR_PATIENCE,
) -> int:
    """JukeMIR's loop: Adam on batches drawn at random from the training examples, `validate()` every
    `evaluate_every` steps, stopping after `patience` evaluations without a better score (or at
    JUKEMIR_MAX_STEPS); the head keeps its best weights. Returns the steps run."""
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr or task.lr, weight_decay=cfg.weight_decay)
    loss_fn = _loss(task)
    generator = torch.Generator().manual_seed(seed)
    train = inputs.windows["train"]
    best, best_state, since_best, steps = -np.inf, copy.deepcopy(head.state_dict()), 0, 0
    while since_best < patience and steps < JUKEMIR_MAX_STEPS:
        head.train()
        for _ in range(evaluate_every):
            batch = train[torch.randint(len(train), (cfg.batch_size,), generator=generator)]
            optimizer.zero_grad()
            loss_fn(head(inputs.values[batch]), inputs.targets[batch]).backward()
            optimizer.step()
        steps += evaluate_every
        valid = validate()
        if valid > best:
            best, best_state, since_best = valid, copy.deepcopy(head.state_dict()), 0
        else:
            since_best += 1
    head.load_state_dict(best_state)
    return steps


def best_on_valid(
    task: Task,
    examples: list[Example],
    features: Features,
    *,
    seed: int,
    heads: list[HeadConfig],
    protocol: Protocol = "marble",
) -> tuple[HeadConfig, ProbeResult]:
    """Train every candidate head; the one with the best validation score is the one reported (JukeMIR)."""
    trained = [(head, train_probe(task, examples, features, seed=seed, cfg=head, protocol=protocol)) for head in heads]
    return max(trained, key=lambda pair: pair[1].valid[task.monitor])


def head_inputs(values: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    """(window, layer, dim) -> the hidden states the head sees: 1..L (MARBLE leaves the input out) or one."""
    if cfg.layer is None:
        return values[:, 1:]
    if not 0 <= cfg.layer < values.shape[1]:
        raise ValueError(f"layer {cfg.layer}: the model has hidden states 0..{values.shape[1] - 1}")
    return values[:, cfg.layer : cfg.layer + 1]


@torch.inference_mode()
def evaluate(
    task: Task, head: nn.Module, examples: list[Example], inputs: ProbeInputs, *, split: str, ensemble: str = "mean"
) -> dict[str, float]:
    """The head's outputs on a split's windows, combined per song (`SONG_ENSEMBLES`), then scored."""
    head.eval()
    chosen = inputs.windows[split]
    shift, spread = inputs.unscale
    outputs = head(inputs.values[chosen]) * spread + shift
    songs = [examples[int(inputs.owners[w])].song_id for w in chosen]
    names = sorted(set(songs))
    index = torch.tensor([names.index(song) for song in songs])
    per_song = song_outputs(outputs, index, len(names), ensemble).numpy()
    first = {song: examples[int(inputs.owners[w])] for w, song in zip(chosen.tolist(), songs, strict=True)}
    return score(task, per_song, np.stack([_target_array(task, first[name].target) for name in names]))


def song_outputs(outputs: torch.Tensor, song: torch.Tensor, songs: int, ensemble: str) -> torch.Tensor:
    """(window, output) -> (song, output): for classes, a song's prediction is the argmax of its row."""
    if ensemble not in SONG_ENSEMBLES:
        raise ValueError(f"song ensemble {ensemble!r}: expected one of {SONG_ENSEMBLES}")
    if ensemble == "vote":  # counts of window predictions; a tie goes to the lower class, as scipy's mode
        outputs = torch.nn.functional.one_hot(outputs.argmax(dim=1), outputs.shape[1]).float()
    elif ensemble == "mean_softmax":
        outputs = outputs.softmax(dim=1)
    elif ensemble == "max_logit":
        rows = torch.full((songs, outputs.shape[1]), -torch.inf)
        return rows.scatter_reduce(0, song[:, None].expand_as(outputs), outputs, reduce="amax")
    summed = torch.zeros(songs, outputs.shape[1]).index_add_(0, song, outputs)
    counts = torch.zeros(songs).index_add_(0, song, torch.ones(len(song)))
    return summed / counts[:, None]


def _windows_of(examples: list[Example], owners: torch.Tensor, split: str) -> torch.Tensor:
    in_split = torch.tensor([example.split == split for example in examples])
    chosen = torch.nonzero(in_split[owners]).flatten()
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


MARBLE_LRS = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)  # MARBLE's optional learning-rate search (hp_search)


def lr_sweep(base: HeadConfig) -> list[HeadConfig]:
    return [replace(base, lr=lr) for lr in MARBLE_LRS]


def jukemir_grid(base: HeadConfig) -> list[HeadConfig]:
    """JukeMIR's 216 heads (docs/ALGORITHM.md §10.1), every combination of: standardisation on or off, hidden
    none or 512, batch 64 or 256, lr 1e-5, 1e-4 or 1e-3, dropout 0.25, 0.5 or 0.75 (input and hidden), L2 0, 1e-4
    or 1e-3; the rest from `base`.

    Under MARBLE's protocol (`--search jukemir`) each head trains with the epoch loop; under JukeMIR's
    (`--protocol jukemir`) with `fit_jukemir`.
    """
    return [
        replace(base, standardize=standardize, hidden=hidden, batch_size=batch, lr=lr, dropout=p, input_dropout=p,
                weight_decay=l2)
        for standardize, hidden, batch, lr, p, l2 in itertools.product(
            (False, True), (0, 512), (64, 256), (1e-5, 1e-4, 1e-3), (0.25, 0.5, 0.75), (0.0, 1e-4, 1e-3)
        )
    ]  # fmt: skip
