"""Music2Vec: the data2vec-audio encoder, its pretraining module and EMA teacher, presets, Hugging Face interop."""

from model.config import PRESETS, ModelConfig, num_frames, preset
from model.encoder import Data2VecAudio, EncoderOutput, Transformer, TransformerOutput
from model.hf import load_hf, save_hf
from model.music2vec import Music2Vec, regression_loss, teacher_targets
from model.teacher import EMATeacher, ema_decay

__all__ = [
    "PRESETS",
    "Data2VecAudio",
    "EMATeacher",
    "EncoderOutput",
    "ModelConfig",
    "Music2Vec",
    "Transformer",
    "TransformerOutput",
    "ema_decay",
    "load_hf",
    "num_frames",
    "preset",
    "regression_loss",
    "save_hf",
    "teacher_targets",
]
