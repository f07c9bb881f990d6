"""One training step through our DeepSpeed engine vs a plain PyTorch loop: same model, optimizer, batch, precision.

Both steps do forward, backward, an AdamW update and the EMA teacher update; the engine adds ZeRO-2 bookkeeping,
its gradient buckets and the step boundary logic. Steps alternate between the two so that load elsewhere on the
machine hits both alike. The goal: engine overhead <= 5 %. Also printed: audio-seconds/s per device, and on a GPU
the model FLOP utilisation against a bf16 matmul measured in the same run.

Usage: python bench/train_step.py [--preset base] [--batch 2] [--seconds 5] [--precision fp32|bf16] [--iters 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import matmul_peak, synchronize

from cluster.environment import from_environment, init_distributed
from data import span_mask
from model import Music2Vec
from trainer.config import load_config
from trainer.engine import Engine, build_optimizer


def build_steps(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], torch.device, torch.dtype]:
    """Two step functions over twin models with the same weights: one plain, one inside our DeepSpeed engine."""
    overrides = [f"model.preset={args.preset}", f"data.batch_size={args.batch}", f"train.precision={args.precision}"]
    cfg = load_config(None, [*overrides, "model.layerdrop=0.0", f"train.zero_stage={args.zero_stage}"])
    init_distributed(from_environment())
    torch.manual_seed(0)
    plain = Music2Vec(cfg.model)
    wrapped = Music2Vec(cfg.model)
    wrapped.load_state_dict(plain.state_dict())
    engine = Engine(wrapped, cfg, world_size=1)
    device, dtype = engine.device, engine.dtype
    plain.to(device, dtype).train()
    plain_optimizer = build_optimizer(plain, cfg)

    samples = int(args.seconds * 16_000)
    audio = torch.randn(args.batch, samples, device=device, dtype=dtype)
    mask = torch.from_numpy(span_mask(args.batch, cfg.model.num_frames(samples), rng=np.random.default_rng(0)))
    mask = mask.to(device)

    def plain_step() -> None:
        loss, _ = plain(audio, mask)
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)
        plain.update_teacher(1)

    def engine_step() -> None:
        loss, _ = engine.forward(audio, mask)
        engine.backward(loss)
        engine.step()
        with engine.gathered(wrapped.encoder.transformer):
            wrapped.update_teacher(1)

    return {"plain PyTorch": plain_step, "DeepSpeed engine": engine_step}, device, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    steps, device, dtype = build_steps(args)

    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.preset} preset, {args.precision}, ZeRO-{args.zero_stage}")
    print(f"batch {args.batch} x {args.seconds:g} s, median of {args.iters} steps each")
    for label, seconds in median.items():
        rate = args.batch * args.seconds / seconds
        print(f"  {label:17} {seconds * 1e3:9.1f} ms/step  {rate:8.1f} audio-s/s per device")
    overhead = median["DeepSpeed engine"] / median["plain PyTorch"] - 1
    print(f"  engine overhead: {overhead:+.1%} (goal <= +5%)")
    if device.type == "cuda":
        with FlopCounterMode(display=False) as counter:
            steps["plain PyTorch"]()
        achieved = counter.get_total_flops() / median["DeepSpeed engine"]
        peak = matmul_peak(device, dtype, size=8192)
        print(f"  MFU: {achieved / 1e12:.1f} TFLOP/s of {peak / 1e12:.1f} measured peak = {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
