"""The fused EMA update vs a per-parameter loop in the style of fairseq's EMAModule, and vs the memory floor.

The floor: an EMA step must read the teacher and the student and write the teacher, 3 x 4 bytes per fp32 parameter;
divided by the copy bandwidth measured in the same run (`dst.copy_(src)` moves 2 x 4 bytes per element).

    python bench/ema.py                # base transformer (88.6 M parameters), CPU or GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from model import EMATeacher, Music2Vec, preset


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], None], device: torch.device, iters: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(iters):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class LoopEMA:
    """The shape of fairseq's EMAModule step with `ema_fp32`: an fp32 shadow dict updated one parameter at a time
    (mul_ then add_), then loaded back into the teacher module (`restore`, a load_state_dict every step)."""

    def __init__(self, teacher: nn.Module, copied_prefixes: tuple[str, ...]) -> None:
        self.teacher = teacher
        self.copied_prefixes = copied_prefixes
        self.fp32_params = {name: tensor.detach().float().clone() for name, tensor in teacher.state_dict().items()}

    @torch.no_grad()
    def step(self, student: nn.Module, decay: float) -> None:
        for name, param in student.state_dict().items():
            ema = self.fp32_params[name]
            if name.startswith(self.copied_prefixes):
                ema.copy_(param)
                continue
            ema.mul_(decay)
            ema.add_(param.to(dtype=ema.dtype), alpha=1 - decay)
        self.teacher.load_state_dict(self.fp32_params, strict=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    student = Music2Vec(preset(args.preset)).encoder.transformer.to(device)
    teacher = EMATeacher(student).to(device)
    numel = sum(p.numel() for p in student.parameters())
    decay = 0.9995

    fused = median_time(lambda: teacher.update(student, decay), device, args.iters)
    baseline = LoopEMA(teacher.model, teacher.copied_prefixes)
    loop = median_time(lambda: baseline.step(student, decay), device, args.iters)
    src = torch.empty(numel, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = median_time(lambda: dst.copy_(src), device, args.iters)
    bandwidth = 2 * 4 * numel / copy
    floor = 3 * 4 * numel / bandwidth

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.preset} transformer, {numel / 1e6:.1f} M fp32 params")
    print(f"  fused foreach lerp   {fused * 1e3:8.2f} ms")
    print(f"  per-parameter loop   {loop * 1e3:8.2f} ms")
    print(f"  memory floor         {floor * 1e3:8.2f} ms  (copy bandwidth {bandwidth / 1e9:.1f} GB/s)")
    print(f"  loop / fused: {loop / fused:.2f}x faster (goal >= 10)")
    print(f"  fused / floor: {fused / floor:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
