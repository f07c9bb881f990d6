"""Forward+backward time of our encoder vs transformers' Data2VecAudioModel, and achieved FLOP/s vs matmul peak.

Both models hold the same weights (ours exported, then loaded by transformers), see the same input in the same
precision, and run in train mode with dropout; LayerDrop is off so both do the same work every step. Timings are
interleaved (ours, theirs, ours, ...) so that drift on a shared machine hits both alike; medians are reported.

    python bench/model_step.py                       # CPU, fp32: the goal is parity (ratio <= 1.0)
    python bench/model_step.py --dtype bf16          # GPU, bf16: the goal is ratio <= 0.8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Data2VecAudioModel

from model import Data2VecAudio, preset, save_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a large square torch.mm: the practical ceiling of this machine in this precision."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best


def train_step(forward: Callable[[], torch.Tensor], model: torch.nn.Module) -> Callable[[], None]:
    def step() -> None:
        loss = forward().float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    ours = Data2VecAudio(preset(args.preset, layerdrop=0.0))
    with tempfile.TemporaryDirectory() as folder:
        save_hf(ours, folder)
        # mask_time_prob=0: in train mode transformers would otherwise draw SpecAugment masks with numpy, on the CPU
        theirs = Data2VecAudioModel.from_pretrained(folder, attn_implementation="sdpa", mask_time_prob=0.0)
    ours.to(device, dtype).train()
    theirs.to(device, dtype).train()
    audio = torch.randn(args.batch, int(args.seconds * 16_000), device=device, dtype=dtype)

    steps = {
        "ours": train_step(lambda: ours(audio).last, ours),
        "transformers": train_step(lambda: theirs(audio).last_hidden_state, theirs),
    }
    for step in steps.values():  # warm-up: allocator, kernels, autotuning
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    median = {name: statistics.median(values) for name, values in times.items()}

    with FlopCounterMode(display=False) as counter:
        steps["ours"]()
    flops = counter.get_total_flops()
    peak = matmul_peak(device, dtype, size=8192 if device.type == "cuda" else 2048)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.preset} preset, {args.dtype}")
    print(f"input: {args.batch} x {args.seconds:g} s; forward+backward, median of {args.iters}")
    print(f"  ours          {median['ours'] * 1e3:9.1f} ms")
    print(f"  transformers  {median['transformers'] * 1e3:9.1f} ms")
    print(f"  ratio ours / transformers: {median['ours'] / median['transformers']:.3f}")
    achieved = flops / median["ours"]
    print(f"  FLOPs per step {flops / 1e9:.1f} G; achieved {achieved / 1e12:.3f} TFLOP/s")
    print(f"  matmul peak {peak / 1e12:.3f} TFLOP/s; MFU (fraction of that peak) {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
