"""The data2vec objective: loss, teacher targets, metrics, and where gradients go."""

import math

import numpy as np
import pytest
import torch

from data import span_mask
from model import Music2Vec, preset, regression_loss, teacher_targets
from model.music2vec import channel_std


def batch(model: Music2Vec, *, size: int = 3, seconds: float = 1.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(size, int(seconds * 16_000), generator=generator)
    frames = model.cfg.num_frames(audio.shape[1])
    mask = torch.from_numpy(span_mask(size, frames, rng=np.random.default_rng(seed)))
    return audio, mask


def test_squared_error_summed_over_channels_averaged_over_frames():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # frame 1: 1 + 4 = 5; frame 2: 1; mean 3
    assert regression_loss(pred, target, beta=0.0, scale=0.5).item() == pytest.approx(1.5)


def test_smooth_l1_with_beta():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # beta 1: |d| = 1 -> 0.5, |d| = 2 -> 1.5; frame 1: 2.0, frame 2: 0.5; mean 1.25
    assert regression_loss(pred, target, beta=1.0, scale=1.0).item() == pytest.approx(1.25)


def test_targets_instance_normalise_each_layer_over_time_then_average_the_top_k():
    # (batch 1, frames 2, channels 1) per layer; the bottom layer is outside the top 2 and must not count.
    bottom = torch.tensor([[[100.0], [-100.0]]])
    middle = torch.tensor([[[1.0], [3.0]]])  # normalised: -1, +1
    top = torch.tensor([[[5.0], [3.0]]])  # normalised: +1, -1
    scale = 1 / math.sqrt(1 + 1e-5)  # instance_norm's eps
    assert torch.allclose(teacher_targets([bottom, middle, top], top_k=2), torch.zeros(1, 2, 1))
    assert torch.allclose(teacher_targets([bottom, middle, top], top_k=1), torch.tensor([[[scale], [-scale]]]))
    assert torch.allclose(teacher_targets([bottom, middle, top], top_k=3), torch.tensor([[[scale / 3], [-scale / 3]]]))


def test_channel_std_is_fairseqs_target_var():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # unbiased var per channel: 2, 0
    assert channel_std(x).item() == pytest.approx((math.sqrt(2 + 1e-6) + math.sqrt(1e-6)) / 2)


def test_forward_is_the_regression_of_the_masked_student_onto_the_unmasked_teacher():
    torch.manual_seed(0)
    model = Music2Vec(preset("tiny")).eval()  # eval: no dropout, so the loss can be recomputed by hand
    model.teacher.model.layers[0].fc1.weight.data.mul_(1.5)  # a teacher that differs from the student
    audio, mask = batch(model)
    loss, metrics = model(audio, mask)
    with torch.no_grad():
        features = model.encoder.features(audio)
        student = model.encoder.transformer(model.encoder.apply_mask(features, mask)).last
        target = teacher_targets(model.teacher.model(features).ffn_outputs, top_k=2)[mask]
        expected = regression_loss(model.final_proj(student[mask]), target, beta=0.0, scale=64**-0.5)
        masked_teacher = teacher_targets(
            model.teacher.model(model.encoder.apply_mask(features, mask)).ffn_outputs, top_k=2
        )[mask]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.allclose(target, masked_teacher)  # so the check above tells unmasked from masked input
    assert metrics["masked_frames"].item() == mask.sum().item()
    assert metrics["masked_fraction"].item() == pytest.approx(mask.float().mean().item())
    assert metrics["target_var"].item() == pytest.approx(channel_std(target).item(), rel=1e-6)


def test_top_k_changes_the_targets():
    torch.manual_seed(0)
    two = Music2Vec(preset("tiny", average_top_k_layers=2)).eval()
    four = Music2Vec(preset("tiny", average_top_k_layers=4)).eval()
    four.load_state_dict(two.state_dict())
    four.teacher.load_state_dict(two.teacher.state_dict())
    audio, mask = batch(two)
    assert two(audio, mask)[0].item() != pytest.approx(four(audio, mask)[0].item())


def test_gradients_reach_the_cnn_and_never_the_teacher():
    torch.manual_seed(0)
    model = Music2Vec(preset("tiny")).train()
    loss, _ = model(*batch(model))
    loss.backward()
    assert model.encoder.feature_extractor.blocks[0].weight.grad.abs().sum() > 0
    assert model.encoder.mask_emb.grad.abs().sum() > 0
    assert model.final_proj.weight.grad.abs().sum() > 0
    teacher_params = list(model.teacher.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    assert {id(p) for p in teacher_params}.isdisjoint(id(p) for p in model.parameters())
    assert not model.teacher.model.training  # model.train() does not reach the teacher


def test_a_bf16_student_trains_against_the_fp32_teacher():
    torch.manual_seed(0)
    model = Music2Vec(preset("tiny")).to(torch.bfloat16)
    audio, mask = batch(model)
    loss, metrics = model(audio.to(torch.bfloat16), mask)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.teacher.model.parameters())
    assert metrics["target_var"] > 0.5  # instance-normalised targets have unit variance per layer
