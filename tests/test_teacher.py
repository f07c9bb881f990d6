"""EMA teacher: decay schedule boundaries, the fused update, state round trip."""

import pytest
import torch

from model import EMATeacher, Music2Vec, ema_decay, preset


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.999), (1, 0.9999 - 0.0009 * (1 - 1 / 30_000)), (15_000, 0.99945), (30_000, 0.9999), (10**6, 0.9999)],
)
def test_decay_is_linear_over_the_anneal_then_constant(step, expected):
    assert ema_decay(step, start=0.999, end=0.9999, anneal_steps=30_000) == pytest.approx(expected, abs=1e-12)


def test_no_anneal_means_the_end_decay_from_the_start():
    assert ema_decay(0, start=0.9, end=0.99, anneal_steps=0) == 0.99


def perturbed_student(model: Music2Vec) -> None:
    with torch.no_grad():
        for p in model.encoder.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_one_update_is_a_lerp_and_copies_the_positional_conv():
    torch.manual_seed(0)
    model = Music2Vec(preset("tiny"))
    before = {name: p.clone() for name, p in model.teacher.model.named_parameters()}
    perturbed_student(model)
    decay = model.update_teacher(step=10)
    assert decay == ema_decay(10, start=0.999, end=0.9999, anneal_steps=30_000)
    student = dict(model.encoder.transformer.named_parameters())
    for name, teacher in model.teacher.model.named_parameters():
        if name.startswith("pos_conv."):
            assert torch.equal(teacher, student[name]), name
        else:
            assert torch.equal(teacher, torch.lerp(before[name], student[name], 1 - decay)), name
            assert not torch.equal(teacher, before[name]), name


def test_a_bf16_student_is_averaged_into_the_fp32_teacher():
    torch.manual_seed(0)
    student = Music2Vec(preset("tiny")).encoder.transformer
    teacher = EMATeacher(student)
    before = {name: p.clone() for name, p in teacher.model.named_parameters()}
    student.to(torch.bfloat16)
    teacher.update(student, 0.9)
    fc1 = "layers.0.fc1.weight"
    expected = torch.lerp(before[fc1], student.get_parameter(fc1).float(), 0.1)
    assert teacher.model.get_parameter(fc1).dtype == torch.float32
    assert torch.equal(teacher.model.get_parameter(fc1), expected)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = Music2Vec(preset("tiny"))
    perturbed_student(model)
    model.update_teacher(step=1)
    fresh = Music2Vec(preset("tiny"))
    fresh.teacher.load_state_dict(model.teacher.state_dict())
    for (name, a), b in zip(model.teacher.state_dict().items(), fresh.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
