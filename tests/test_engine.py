"""The DeepSpeed engine in this process (one gloo rank): the optimizer each device gets, and bf16 gradients that
accumulate in fp32 as the templates ask."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.utils import safe_get_full_grad

from data import span_mask
from model import Music2Vec
from trainer.config import load_config
from trainer.ds_config import deepspeed_config, template_path
from trainer.engine import Engine, build_optimizer, optimizer_choice

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
NO_DROPOUT = ["model.dropout=0", "model.attention_dropout=0", "model.layerdrop=0"]  # identical twins, step for step


pytestmark = pytest.mark.usefixtures("one_rank")


@pytest.mark.parametrize(
    ("device", "offload", "expected"),
    [
        ("cuda", False, "torch_adamw_fused"),  # shipped compiled with torch: a GPU node needs no compiler
        ("cpu", False, "torch_adamw"),
        ("cuda", True, "deepspeed_cpu_adam"),  # ZeRO-Offload insists on DeepSpeed's CPU Adam
        ("cpu", True, "deepspeed_cpu_adam"),
    ],
)
def test_the_optimizer_is_chosen_by_device_and_offload(device, offload, expected):
    assert optimizer_choice(device, offload=offload) == expected


def batches(cfg, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    samples = round(cfg.data.crop_seconds * 16_000)
    frames = cfg.model.num_frames(samples)
    size = cfg.data.batch_size
    return [(torch.randn(size, samples), torch.from_numpy(span_mask(size, frames, rng=rng))) for _ in range(count)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_gpu_optimizer_trains_under_every_zero_stage(stage):
    """torch's fused AdamW (the GPU choice; torch also has it on the CPU) under DeepSpeed's ZeRO wrappers takes the
    same steps as the multi-tensor AdamW the CPU uses."""
    import deepspeed

    cfg = load_config(TINY, [*NO_DROPOUT, f"train.zero_stage={stage}"])
    weights = {}
    for choice in ("torch_adamw_fused", "torch_adamw"):
        torch.manual_seed(0)
        model = Music2Vec(cfg.model)
        optimizer = build_optimizer(model, cfg.optim, choice)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1))
        assert optimizer.defaults["fused"] is (True if choice == "torch_adamw_fused" else None)
        for audio, mask in batches(cfg, 3):
            loss, _ = engine(audio.to(engine.device), mask.to(engine.device))
            engine.backward(loss)
            engine.step()
        weights[choice] = {name: safe_get_full_fp32(param) for name, param in engine.module.named_parameters()}
    torch.manual_seed(0)
    initial = Music2Vec(cfg.model).state_dict()
    for name, reference in weights["torch_adamw"].items():
        torch.testing.assert_close(weights["torch_adamw_fused"][name], reference, rtol=1e-5, atol=1e-6, msg=name)
    moved = [name for name, tensor in weights["torch_adamw"].items() if not torch.equal(tensor.cpu(), initial[name])]
    assert len(moved) > len(initial) // 2  # both really stepped


def safe_get_full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).clone()


def accumulated_gradient_error(stage: int, template: str | None) -> float:
    """Relative error of DeepSpeed's gradient after two bf16 micro-batches against the exact sum of the two."""
    overrides = [*NO_DROPOUT, "train.precision=bf16", "train.grad_accum=2", f"train.zero_stage={stage}"]
    if template:
        overrides.append(f"train.ds_config={template}")
    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    model = Music2Vec(cfg.model)
    twin = copy.deepcopy(model)  # the teacher too: it is not in the state_dict
    engine = Engine(model, cfg, world_size=1)
    twin.to(engine.device, torch.bfloat16)  # the same kernels as the engine's bf16 module
    if template is None:  # the shipped template: reduce and accumulate in fp32
        assert engine.ds.communication_data_type == torch.float32
        assert engine.ds.get_data_types() == (torch.bfloat16, torch.float32)
    name = "encoder.transformer.layers.0.fc1.weight"
    exact = torch.zeros_like(dict(twin.named_parameters())[name], dtype=torch.float64)  # on the engine's device
    for index, (audio, mask) in enumerate(batches(cfg, 2)):
        loss, _ = twin(audio.to(engine.device, torch.bfloat16), mask.to(engine.device))
        (loss / 2).backward()  # as DeepSpeed scales the loss of each of the 2 micro-batches
        exact += dict(twin.named_parameters())[name].grad.double()
        twin.zero_grad()
        loss, _ = engine.forward(audio, mask)
        engine.backward(loss)
        if index == 0:
            engine.step()  # not yet the update boundary: the gradient accumulates
    accumulated = safe_get_full_grad(dict(engine.model.named_parameters())[name]).double().to(exact.device)
    return float((accumulated - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32(stage, tmp_path):
    """Two bf16 micro-batches: the shipped template sums their gradients exactly; DeepSpeed's default (bf16) rounds
    the sum to 8 bits of mantissa, which over many micro-batches or ranks loses what fairseq's fp32 sums keep."""
    default = json.loads(template_path(load_config(TINY, [f"train.zero_stage={stage}"])).read_text())
    del default["communication_data_type"], default["data_types"]
    bf16_sums = tmp_path / "bf16_sums.json"
    bf16_sums.write_text(json.dumps(default))
    assert accumulated_gradient_error(stage, None) < 1e-6
    assert accumulated_gradient_error(stage, str(bf16_sums)) > 1e-4


def test_weights_only_loading_holds_when_nested_and_overrides_the_callers_request(tmp_path):
    """DeepSpeed's loaders ask for `weights_only=False`; inside the block they get weights-only loading with
    DeepSpeed's state classes allowed, also after an inner block (torch's own `safe_globals` would drop them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from test_reliability import PlantedCode

    from trainer.engine import weights_only_loading

    state, planted, evidence = tmp_path / "state.pt", tmp_path / "planted.pt", tmp_path / "the-pickle-ran"
    torch.save({"loss_scaler": LossScaler(128.0)}, state)
    torch.save({"optimizer": PlantedCode(evidence)}, planted)
    with weights_only_loading():
        with weights_only_loading():
            pass
        assert torch.load(state, weights_only=False)["loss_scaler"].cur_scale == 128.0
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(planted, weights_only=False)
    assert not evidence.exists()
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(state, weights_only=True)  # outside the block: not allowed by default
