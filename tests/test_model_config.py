"""Presets, parameter counts, frame arithmetic and config validation."""

import pytest
import torch
from transformers import Data2VecAudioConfig, Data2VecAudioModel

from model import PRESETS, Data2VecAudio, ModelConfig, Music2Vec, num_frames, preset
from model.hf import hf_config


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_base_matches_data2vec_audio_base_parameter_counts():
    with torch.device("meta"):
        model = Music2Vec(preset("base"))
    assert count(model.encoder) == 93_164_288
    assert count(model.final_proj) == 590_592
    assert count(model.teacher.model) == 88_561_920  # the teacher's fp32 shadow, pos_conv included


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_the_parameter_count_of_the_reference_implementation(name):
    cfg = preset(name)
    with torch.device("meta"):
        ours = Data2VecAudio(cfg)
        reference = Data2VecAudioModel(Data2VecAudioConfig(**hf_config(cfg)))
    assert count(ours) == count(reference)


def test_large_is_in_the_mert_330m_size_class():
    with torch.device("meta"):
        assert 300e6 < count(Data2VecAudio(preset("large"))) < 340e6


@pytest.mark.parametrize(("seconds", "frames"), [(5, 249), (10, 499), (20, 999), (30, 1499)])
def test_frame_counts_at_16khz(seconds, frames):
    assert num_frames(seconds * 16_000) == frames
    assert preset("base").num_frames(seconds * 16_000) == frames


@pytest.mark.parametrize("samples", [399, 400, 719, 720, 1234, 16_000, 16_321])
def test_frame_count_is_what_the_cnn_emits(samples):
    cfg = preset("tiny")
    extractor = Data2VecAudio(cfg).feature_extractor
    if samples < 400:  # shorter than the receptive field: no frame at all
        assert cfg.num_frames(samples) == 0
        return
    with torch.no_grad():
        frames = extractor(torch.zeros(1, samples)).shape[1]
    assert cfg.num_frames(samples) == frames


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"heads": 7}, "heads=7"),
        ({"average_top_k_layers": 13}, "average_top_k_layers=13"),
        ({"layerdrop": 1.5}, "layerdrop=1.5"),
        ({"pos_conv_kernel": 18}, "pos_conv_kernel=18"),
        ({"ema_decay": 0.99999}, "ema_decay"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        preset("base", **overrides)


def test_unknown_preset_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="top_k"):
        preset("base", top_k=12)


def test_top_k_is_the_papers_ablation_knob():
    assert preset("base").average_top_k_layers == 8
    assert preset("base", average_top_k_layers=12).average_top_k_layers == 12
    assert ModelConfig().regression_scale == pytest.approx(768**-0.5)
