"""`music2vec export`: the fp32 weights of a COMPLETE checkpoint as a Hugging Face `Data2VecAudioModel` folder.

Every checkpoint already comes with `exports/step_N`, the student's encoder in the training precision, written while
training. This one is written afterwards, from the checkpoint alone, in full precision:

- `student`: the optimizer's fp32 master weights, merged from the ZeRO partitions of every rank by DeepSpeed's
  own consolidation (`deepspeed.utils.zero_to_fp32`), for any ZeRO stage and any number of ranks. Under bf16 these
  are more precise than the training export, which holds the bf16 weights the forward used.
- `teacher`: the EMA model, the one the student regressed on: the teacher's transformer (`teacher.safetensors`, kept
  in fp32) behind the student's CNN and feature projection, which the teacher shares (docs/ALGORITHM.md §6).

The folder is written beside `out` and renamed into place last, so `out` never holds half an export.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from torch import Tensor

from model import Data2VecAudio
from model.hf import save_hf
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, unreadable
from trainer.engine import weights_only_loading
from trainer.layout import COMPLETE, complete_checkpoints, step_of

Weights = Literal["student", "teacher"]
ENCODER_PREFIX = "encoder."  # the student's encoder inside the pretraining module; the rest is the regression head
TRANSFORMER_PREFIX = "transformer."  # the part of the encoder the teacher averages


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder `path` names: a run's checkpoints/step_N, or a run directory (its newest complete
    checkpoint). Refuses a folder without COMPLETE (an interrupted save), naming it and the complete ones."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or run directory")
    if step_of(path) is None:
        checkpoints = complete_checkpoints(path)
        if not checkpoints:
            raise FileNotFoundError(f"{path}: neither a checkpoints/step_N folder nor a run directory with one")
        return checkpoints[-1][1]
    if not (path / COMPLETE).is_file():
        complete = [folder.name for _, folder in complete_checkpoints(path.parent.parent)]
        raise CheckpointError(
            f"{path}: incomplete (no {COMPLETE}: a save that was interrupted); export a complete one"
            + (f": {', '.join(complete)}" if complete else "")
        )
    return path


def export(path: Path, out: Path, *, weights: Weights = "student") -> Path:
    """Write `weights` of the checkpoint at `path` (see `find_checkpoint`) to the folder `out`, in fp32; returns the
    checkpoint folder it read."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose another --out or remove it")
    folder = find_checkpoint(path)
    checkpoint.verify(folder, config_digest=None)  # a damaged file is named before the long read
    cfg = checkpoint.saved_config(folder)
    state = encoder_state(consolidated_student(folder))
    if weights == "teacher":
        state = with_teacher(state, checkpoint.load_teacher(folder))
    encoder = Data2VecAudio(cfg.model)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{folder}: its weights do not fit its own config.yaml ({error})") from None
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that was interrupted
    save_hf(encoder, partial)
    provenance = {"checkpoint": str(folder.resolve()), "weights": weights, "step": step_of(folder)}
    (partial / "music2vec_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    partial.rename(out)
    return folder


def consolidated_student(folder: Path) -> dict[str, Tensor]:
    """The pretraining module's fp32 master weights, whole, from the ZeRO shards of every rank in `folder`.
    DeepSpeed's consolidation asks torch to unpickle anything; under `weights_only_loading` it loads weights only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loading():
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
            raise unreadable(folder, error) from None


def encoder_state(module_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's part of the pretraining module's state, under the encoder's own names."""
    return {name[len(ENCODER_PREFIX) :]: t for name, t in module_state.items() if name.startswith(ENCODER_PREFIX)}


def with_teacher(encoder: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The student's encoder with its transformer replaced by the teacher's."""
    state = {name: t for name, t in encoder.items() if not name.startswith(TRANSFORMER_PREFIX)}
    state.update({TRANSFORMER_PREFIX + name: t.float() for name, t in teacher.items()})
    return state
