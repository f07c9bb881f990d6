"""One training update through our DeepSpeed engine vs a plain PyTorch loop: same model, optimizer, batch, precision.

Both do forward and backward of every micro-batch, an AdamW update (the same implementation, `optimizer_choice`) and
the EMA teacher update. The plain loop trains in bf16 the way plain PyTorch does, fp32 weights under bf16 autocast;
the engine adds ZeRO's gradient buckets, bf16 weights with an fp32 master copy, and its step boundary logic. Updates
alternate so that load elsewhere on the machine hits all alike. The goal: engine overhead <= 5 %.

`--versus` adds a third twin, the engine with one option changed, timed in the same rotation, so its cost is a ratio
against the engine measured in the same run: `compile` (train.compile), `deterministic` (train.deterministic; the
cuBLAS workspace setting it needs is then in force for every twin), `bf16-reduce` (gradients reduced and accumulated
in bf16, DeepSpeed's default, instead of the templates' fp32; give --grad-accum 2 or more).

Also printed: audio-seconds/s per device, peak GPU memory, and on a GPU the model FLOP utilisation (MFU, the teacher's
forward counted) against a bf16 matmul measured in the same run, with the wall-clock that MFU projects for the
paper's recipe (400k updates of 96 crops x 5 s per GPU) on 8 A100s.

    python bench/train_step.py                                      # CPU: base, fp32, 2 x 5 s
    python bench/train_step.py --precision bf16 --batch 96          # GPU: the paper's per-GPU batch
    python bench/train_step.py --precision bf16 --batch 96 --versus compile
    python bench/train_step.py --precision bf16 --batch 48 --grad-accum 2 --versus bf16-reduce
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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
from trainer.config import ExperimentConfig, load_config
from trainer.ds_config import template_path
from trainer.engine import Engine, build_optimizer, optimizer_choice
from trainer.train import use_deterministic_kernels

A100_BF16_PEAK = 312e12  # dense bf16 FLOP/s of an A100's tensor cores (NVIDIA's datasheet)
PAPER_UPDATES, PAPER_CROPS_PER_GPU, PAPER_GPUS = 400_000, 96, 8
ENGINE = "DeepSpeed engine"


def experiment(args: argparse.Namespace, *, compile_: bool = False, bf16_reduce: bool = False) -> ExperimentConfig:
    overrides = [
        f"model.preset={args.preset}",
        "model.layerdrop=0.0",  # every twin does the same work every update
        f"data.batch_size={args.batch}",
        f"train.precision={args.precision}",
        f"train.zero_stage={args.zero_stage}",
        f"train.grad_accum={args.grad_accum}",
        f"train.compile={str(compile_).lower()}",
    ]
    if bf16_reduce:  # the template without its fp32 reduction and accumulation
        template = json.loads(template_path(load_config(None, overrides)).read_text())
        del template["communication_data_type"], template["data_types"]
        path = Path(tempfile.mkdtemp()) / "bf16_reduce.json"
        path.write_text(json.dumps(template))
        overrides.append(f"train.ds_config={path}")
    return load_config(None, overrides)


class Batch:
    def __init__(self, cfg: ExperimentConfig, seconds: float, device: torch.device) -> None:
        samples = int(seconds * 16_000)
        size = cfg.data.batch_size
        self.audio = torch.randn(size, samples, device=device)
        mask = span_mask(size, cfg.model.num_frames(samples), rng=np.random.default_rng(0))
        self.mask = torch.from_numpy(mask).to(device)


def engine_update(cfg: ExperimentConfig, batch: Batch, weights: dict[str, torch.Tensor]) -> Callable[[], None]:
    torch.manual_seed(0)
    model = Music2Vec(cfg.model)
    model.load_state_dict(weights)
    engine = Engine(model, cfg, world_size=1)

    def update() -> None:
        for _ in range(cfg.train.grad_accum):
            loss, _ = engine.forward(batch.audio, batch.mask)
            engine.backward(loss)
            engine.step()
        with engine.gathered(model.encoder.transformer):
            model.update_teacher(1)

    return update


def plain_update(cfg: ExperimentConfig, batch: Batch, plain: Music2Vec) -> Callable[[], None]:
    device = batch.audio.device
    plain.to(device).train()
    if cfg.train.compile:
        plain.compile_blocks()
    optimizer = build_optimizer(plain, cfg.optim, optimizer_choice(device.type, offload=False))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.precision]

    def update() -> None:
        for _ in range(cfg.train.grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = plain(batch.audio, batch.mask)
            (loss / cfg.train.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad()
        plain.update_teacher(1)

    return update


def deterministic(update: Callable[[], None]) -> Callable[[], None]:
    def wrapped() -> None:
        torch.use_deterministic_algorithms(True)
        try:
            update()
        finally:
            torch.use_deterministic_algorithms(False)

    return wrapped


def build_updates(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], ExperimentConfig, torch.device]:
    """Update functions over twin models with the same weights: plain, the engine, and the engine's variant."""
    init_distributed(from_environment())
    cfg = experiment(args)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    plain = Music2Vec(cfg.model)
    batch = Batch(cfg, args.seconds, device)
    updates = {"plain PyTorch": plain_update(cfg, batch, plain), ENGINE: engine_update(cfg, batch, plain.state_dict())}
    if args.versus == "compile":
        updates[f"{ENGINE}, compiled"] = engine_update(experiment(args, compile_=True), batch, plain.state_dict())
    elif args.versus == "bf16-reduce":
        variant = experiment(args, bf16_reduce=True)
        updates[f"{ENGINE}, bf16 reduce"] = engine_update(variant, batch, plain.state_dict())
    elif args.versus == "deterministic":
        updates[f"{ENGINE}, deterministic"] = deterministic(engine_update(cfg, batch, plain.state_dict()))
    return updates, cfg, device


def median_times(updates: dict[str, Callable[[], None]], device: torch.device, iters: int) -> dict[str, float]:
    for update in updates.values():
        update()  # warm-up: allocator, kernels, compilation
    times: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(iters):
        for name, update in updates.items():
            synchronize(device)
            started = time.perf_counter()
            update()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def update_flops(cfg: ExperimentConfig, seconds: float) -> float:
    """FLOPs of one update (forward, the teacher's forward, backward) of an uncompiled twin: FlopCounterMode sees
    only what runs through torch's dispatcher, which compiled kernels do not."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = Music2Vec(cfg.model).to(device).train()
    batch = Batch(cfg, seconds, device)
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = model(batch.audio, batch.mask)
        loss.backward()
    return counter.get_total_flops() * cfg.train.grad_accum


def report_gpu(engine_seconds: float, cfg: ExperimentConfig, seconds: float) -> None:
    """Peak memory, the MFU of the engine's update, and what that MFU projects for the paper's recipe on 8 A100s."""
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"  peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated (all twins)")
    flops = update_flops(cfg, seconds)
    peak = matmul_peak(device, torch.bfloat16, size=8192)
    mfu = flops / engine_seconds / peak
    print(f"  MFU: {flops / engine_seconds / 1e12:.1f} TFLOP/s of {peak / 1e12:.0f} measured bf16 peak = {mfu:.2f}")
    crops = cfg.data.batch_size * cfg.train.grad_accum
    flops_per_paper_update = flops / crops * PAPER_CROPS_PER_GPU * (5.0 / seconds)
    days = PAPER_UPDATES * flops_per_paper_update / (mfu * A100_BF16_PEAK) / 86_400
    print(
        f"  at this MFU, {PAPER_UPDATES:,} updates of {PAPER_CROPS_PER_GPU} x 5 s per GPU on {PAPER_GPUS} A100s"
        f" ({A100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16) take {days:.2f} days (the paper: about 6)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--versus", choices=["compile", "deterministic", "bf16-reduce"], help="a third twin")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    if args.versus == "deterministic":
        use_deterministic_kernels()  # the cuBLAS workspace setting must precede cuBLAS's start
        torch.use_deterministic_algorithms(False)  # ... while only the variant's updates are deterministic
    updates, cfg, device = build_updates(args)
    median = median_times(updates, device, args.iters)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.preset} preset, {args.precision}, ZeRO-{args.zero_stage}")
    print(f"batch {args.batch} x {args.seconds:g} s x {args.grad_accum} micro-batches, median of {args.iters} updates")
    for label, seconds in median.items():
        rate = args.batch * args.grad_accum * args.seconds / seconds
        print(f"  {label:34} {seconds * 1e3:9.1f} ms/update  {rate:8.1f} audio-s/s per device")
    overhead = median[ENGINE] / median["plain PyTorch"] - 1
    print(f"  engine overhead: {overhead:+.1%} (goal <= +5%)")
    for label in [label for label in median if label.startswith(f"{ENGINE},")]:
        print(f"  {label.removeprefix(f'{ENGINE}, ')} / engine: {median[label] / median[ENGINE]:.3f}")
    if device.type == "cuda":
        report_gpu(median[ENGINE], cfg, args.seconds)


if __name__ == "__main__":
    main()
