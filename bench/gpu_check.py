"""The GPU acceptance suite (`make gpu-check`): what a user's first GPU run needs, checked in one call of minutes.

It installs the project, offline, into a venv layered over the machine's own Python (torch and its CUDA stack come
from there, the rest from the wheels `make gpu-wheels` wrote), then runs every check below as a process of its own
with a time limit: correctness checks side by side, timings with the GPU to themselves, and with the time left the
quicker test files with the GPU visible. It writes gpu_check.json, gpu_check.md and gpu_check.log to --out and
prints the table. A check that does not fit in what is left of --budget is listed as not started.

Without a GPU it rehearses on the CPU: every check that can run does, the GPU-only ones are listed as skipped.

    python3 bench/gpu_check.py --out $OUT                                  # on the GPU machine: everything
    python3 bench/gpu_check.py --out /tmp/check --only train,resume --quick    # some checks, one configuration each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
BASE = REPO / "configs" / "music2vec_base.yaml"
A100_USABLE_GIB = 38.0  # a 40 GB A100 less what the CUDA context and NCCL keep for themselves
QUICK_TEST_FILES = (  # the test files that take seconds, not minutes; the rest train for minutes on CPU-sized runs
    "tests/test_engine.py",
    "tests/test_devices.py",
    "tests/test_pretraining.py",
    "tests/test_teacher.py",
    "tests/test_hf.py",
    "tests/test_masking.py",
    "tests/test_model_config.py",
    "tests/test_trainer_config.py",
    "tests/test_checkpoint.py",
    "tests/test_probes.py",
    "tests/test_loader.py",
)


# --- what a check is, and the context its process gets ----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    what: str  # one line for the report
    cost_s: int  # expected wall time on the GPU machine; not started with less than this left of the budget
    gpu_only: bool = False
    alone: bool = False  # a timing: runs with the GPU to itself, after the checks that share it


@dataclass(frozen=True)
class Context:
    workdir: Path
    venv: Path
    gpu: bool
    quick: bool

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def music2vec(self) -> str:
        return str(self.venv / "bin" / "music2vec")

    @property
    def tiny_shards(self) -> Path:
        return self.workdir / "tiny_shards" / "manifest.json"

    @property
    def precision(self) -> str:
        """What the tiny runs train in: bf16, as users train on GPUs; fp32 on the CPU, as the tests do."""
        return "bf16" if self.gpu else "fp32"


def outcome(status: str, summary: str, **details: Any) -> dict[str, Any]:
    return {"status": status, "summary": summary, "details": details}


def passed_if(ok: bool, summary: str, **details: Any) -> dict[str, Any]:
    return outcome("passed" if ok else "failed", summary, **details)


# --- running things --------------------------------------------------------------------------------------------


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command of the check, its output echoed into the check's log."""
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=timeout, cwd=REPO)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", flush=True)
    return result


def train_command(ctx: Context, run_dir: Path, *overrides: str) -> list[str]:
    return [
        ctx.music2vec,
        "train",
        str(TINY),
        f"data.shards={ctx.tiny_shards}",
        f"train.run_dir={run_dir}",
        f"train.precision={ctx.precision}",
        *overrides,
    ]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    from trainer.metrics import read_metrics  # inside a check's process: the orchestrator imports only the stdlib

    return read_metrics(run_dir)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    from cluster.attempts import read_events  # inside a check's process, as above

    return read_events(run_dir)


def falling(losses: list[float]) -> bool:
    """Finite, and lower at the end than at the start (means of three, to ride out noise)."""
    return all(math.isfinite(loss) for loss in losses) and len(losses) >= 6 and sum(losses[-3:]) < sum(losses[:3])


def wait_for(path: Path, process: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# --- the checks (each runs in its own process, inside the check venv) -------------------------------------------


def check_environment(_ctx: Context) -> dict[str, Any]:
    import platform

    import deepspeed
    import torch
    from deepspeed.git_version_info import installed_ops

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "deepspeed_prebuilt_ops": sorted(name for name, built in installed_ops.items() if built),
        "nvcc": shutil.which("nvcc"),
        "cpus": len(os.sched_getaffinity(0)),
        "torch_from": str(Path(torch.__file__).parent),
    }
    if not torch.cuda.is_available():
        return outcome("passed", "no GPU: a rehearsal on the CPU", **info)
    properties = torch.cuda.get_device_properties(0)
    smi = shutil.which("nvidia-smi")
    driver = run([smi, "--query-gpu=driver_version", "--format=csv,noheader"]).stdout.strip() if smi else None
    info |= {
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "capability": f"{properties.major}.{properties.minor}",
        "driver": driver,
        "bf16": torch.cuda.is_bf16_supported(),
    }
    summary = f"{properties.name}, driver {driver}, torch {torch.__version__} (CUDA {torch.version.cuda})"
    return passed_if(info["bf16"], summary, **info)


def check_data(ctx: Context) -> dict[str, Any]:
    from data import ShardParams, write_shards
    from data.demo import write_demo_corpus

    folder = ctx.tiny_shards.parent
    audio = ctx.workdir / "tiny_audio"
    write_demo_corpus(audio, clips=12, seconds=8.0)
    manifest = write_shards([str(audio)], folder, ShardParams(clip_seconds=8, min_seconds=4, max_count=2))
    return passed_if(
        ctx.tiny_shards.is_file(), f"{manifest['total_samples']} clips in {len(manifest['shards'])} shards"
    )


def check_optimizer_without_compiler(ctx: Context) -> dict[str, Any]:
    """CUDA_HOME unset, nvcc off PATH, no C++ compiler, an empty extension cache: the default path trains and builds
    nothing, on a GPU and on the CPU alike."""
    path = [folder for folder in os.environ["PATH"].split(os.pathsep) if not (Path(folder) / "nvcc").exists()]
    env = {name: value for name, value in os.environ.items() if name not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(path)
    extensions = ctx.workdir / "torch_extensions"
    extensions.mkdir()
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    env["CXX"] = "/nonexistent/c++"  # the GPU image has a compiler; the node a user trains on may not
    run_dir = ctx.workdir / "no_compiler"
    result = run(train_command(ctx, run_dir, "optim.max_updates=6", "train.checkpoint_every=6"), env=env)
    built = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*.so"))
    losses = [m["loss"] for m in metrics(run_dir)]
    ok = result.returncode == 0 and len(losses) == 6 and not built
    return passed_if(ok, f"trained 6 updates; extensions built: {built or 'none'}", built=built, losses=losses)


def check_train(ctx: Context) -> dict[str, Any]:
    """ZeRO 1, 2, 3 x bf16, fp16, fp32 on the tiny model: falling finite loss, fp16's loss scale, an fp32 teacher,
    an export transformers loads, GPU memory in TensorBoard; the ZeRO-3 teacher against the ZeRO-2 one."""
    configs = [(stage, precision) for stage in (1, 2, 3) for precision in ("bf16", "fp16", "fp32")]
    if ctx.quick:
        configs = [(2, ctx.precision)]
    skipped = [f"zero{s}/{p}" for s, p in configs if p == "fp16" and not ctx.gpu]  # DeepSpeed has no CPU fp16
    runnable = [(s, p) for s, p in configs if f"zero{s}/{p}" not in skipped]
    with ThreadPoolExecutor(max_workers=3) as pool:  # the runs only; what they wrote is read in this thread
        exits = list(pool.map(lambda config: train_tiny(ctx, *config), runnable))
    results = {f"zero{s}/{p}": run_problems(ctx, s, p, code) for (s, p), code in zip(runnable, exits, strict=True)}
    problems = [f"{name}: {problem}" for name, found in results.items() for problem in found["problems"]]
    teachers = compare_teachers(ctx, [p for s, p in runnable if s == 3 and (2, p) in runnable])
    limits = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}  # 16-bit students round their weights at 1e-3 already
    problems += [f"{p}: ZeRO-3 teacher differs from ZeRO-2 by {d:.2e}" for p, d in teachers.items() if d > limits[p]]
    summary = f"{len(runnable)} configurations trained" + (f"; {', '.join(skipped)} need a GPU" if skipped else "")
    return passed_if(not problems, summary if not problems else "; ".join(problems), runs=results, teachers=teachers)


TRAIN_UPDATES = 16


def train_dir(ctx: Context, stage: int, precision: str) -> Path:
    return ctx.workdir / "train" / f"zero{stage}_{precision}"


def train_tiny(ctx: Context, stage: int, precision: str) -> int:
    every = [f"optim.max_updates={TRAIN_UPDATES}", f"train.checkpoint_every={TRAIN_UPDATES}", "train.log_every=4"]
    config = [f"train.zero_stage={stage}", f"train.precision={precision}"]
    return run(train_command(ctx, train_dir(ctx, stage, precision), *every, *config)).returncode


def run_problems(ctx: Context, stage: int, precision: str, exit_code: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    run_dir = train_dir(ctx, stage, precision)
    entries = metrics(run_dir)
    problems = [] if exit_code == 0 else [f"exit {exit_code}"]
    losses = [entry["loss"] for entry in entries]
    if not falling(losses):
        problems.append(f"loss not finite and falling: {losses}")
    scales = [entry.get("loss_scale") for entry in entries]
    if precision == "fp16" and not (scales and all(scale and scale > 0 for scale in scales)):
        problems.append(f"fp16 loss scale not positive: {scales}")
    step = f"step_{TRAIN_UPDATES:09d}"
    teacher = run_dir / "checkpoints" / step / "teacher.safetensors"
    if teacher.is_file() and {t.dtype for t in load_file(teacher).values()} != {torch.float32}:
        problems.append("the teacher is not fp32")
    problems += export_problems(run_dir / "exports" / step)
    if ctx.gpu:
        problems += memory_problems(run_dir)
    return {"problems": problems, "losses": losses, "loss_scale": scales[-1] if scales else None}


def export_problems(export: Path) -> list[str]:
    """The export loads in transformers and computes what our encoder computes."""
    import torch
    from transformers import Data2VecAudioModel

    from model import load_hf

    if not (export / "model.safetensors").is_file():
        return [f"no export at {export}"]
    theirs = Data2VecAudioModel.from_pretrained(export).eval()
    audio = torch.randn(1, 32_000)
    with torch.no_grad():
        difference = (theirs(audio).last_hidden_state - load_hf(export).eval()(audio).last).abs().max().item()
    return [] if difference < 1e-3 else [f"the export's transformers output differs by {difference:.2e}"]


def memory_problems(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    wanted = {"system/gpu_max_allocated_gb", "system/gpu_max_reserved_gb"}
    if not wanted <= tags:
        return [f"TensorBoard lacks {sorted(wanted - tags)}"]
    return [] if events.Scalars("system/gpu_max_allocated_gb")[-1].value > 0 else ["GPU memory logged as 0"]


def compare_teachers(ctx: Context, precisions: list[str]) -> dict[str, float]:
    """The largest difference between the ZeRO-2 and ZeRO-3 teachers, per precision that has both."""
    from safetensors.torch import load_file

    differences = {}
    for precision in precisions:
        files = [train_dir(ctx, stage, precision) / "checkpoints" / f"step_{TRAIN_UPDATES:09d}" for stage in (2, 3)]
        if all((folder / "teacher.safetensors").is_file() for folder in files):
            two, three = (load_file(folder / "teacher.safetensors") for folder in files)
            differences[precision] = max((two[name] - three[name]).abs().max().item() for name in two)
    return differences


def check_flash_attention(_ctx: Context) -> dict[str, Any]:
    """base in bf16, forward and backward, with SDPA allowed only its flash kernel: it raises if flash cannot run."""
    import numpy as np
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from data import span_mask
    from model import Music2Vec, preset

    cfg = preset("base")
    model = Music2Vec(cfg).cuda().to(torch.bfloat16).train()
    audio = torch.randn(8, 80_000, device="cuda", dtype=torch.bfloat16)
    mask = torch.from_numpy(span_mask(8, cfg.num_frames(80_000), rng=np.random.default_rng(0))).cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for _ in range(2):  # the second one timed
            torch.cuda.synchronize()
            started = time.perf_counter()
            loss, _ = model(audio, mask)
            loss.backward()
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return passed_if(bool(torch.isfinite(loss)), f"8 x 5 s forward+backward on flash only: {seconds * 1e3:.0f} ms")


def check_resume(ctx: Context) -> dict[str, Any]:
    """kill -9 after a checkpoint, then the same command: bitwise with train.deterministic, close without."""
    variants = ("true",) if ctx.quick else ("true", "false")
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = dict(zip(variants, pool.map(lambda d: resume_variant(ctx, d), variants), strict=True))
    bitwise = found["true"]["max_loss_difference"] == 0 and found["true"]["weights_equal"]
    close = all(v["max_loss_difference"] < 1e-2 and v["completed"] for v in found.values())
    summary = ", ".join(
        f"deterministic={d}: losses differ by {v['max_loss_difference']:.1e}" for d, v in found.items()
    )
    return passed_if(bitwise and close, summary, **found)


def resume_variant(ctx: Context, deterministic: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    root = ctx.workdir / f"resume_deterministic_{deterministic}"
    extra = ["optim.max_updates=16", "train.checkpoint_every=8", "train.log_every=4", "train.keep_last=3"]
    extra.append(f"train.deterministic={deterministic}")
    straight = run(train_command(ctx, root / "straight", *extra))
    cmd = train_command(ctx, root / "killed", *extra)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, **quiet)
    reached = wait_for(root / "killed" / "checkpoints" / "step_000000008" / "COMPLETE", process, timeout=300)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run(cmd)
    ours, reference = metrics(root / "killed"), metrics(root / "straight")
    differences = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(ours, reference, strict=False)]
    name = "exports/step_000000016/model.safetensors"
    weights_equal = False
    if (root / "killed" / name).is_file() and (root / "straight" / name).is_file():
        a, b = load_file(root / "killed" / name), load_file(root / "straight" / name)
        weights_equal = all(torch.equal(a[key], b[key]) for key in b)
    return {
        "completed": straight.returncode == 0 and reached and resumed.returncode == 0 and len(ours) == 16,
        "max_loss_difference": max(differences) if len(differences) == 16 else float("inf"),
        "weights_equal": weights_equal,
    }


def check_gpu_per_task(ctx: Context) -> dict[str, Any]:
    """Local rank 1 of 2 seeing one GPU, as where SLURM binds one GPU to each task: it trains on that GPU."""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "1"}
    env |= {"LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29_400 + os.getpid() % 500)}
    run_dir = ctx.workdir / "gpu_per_task"
    result = run(train_command(ctx, run_dir, "optim.max_updates=4", "train.checkpoint_every=4"), env=env)
    trained = len(metrics(run_dir)) == 4
    return passed_if(result.returncode == 0 and trained, "local rank 1 trained on cuda:0" if trained else "failed")


def check_launch_requeue(ctx: Context) -> dict[str, Any]:
    """`music2vec launch --executor local`: USR2 mid-run -> checkpoint, requeue, resume, finish (NCCL on a GPU)."""
    run_dir = ctx.workdir / "launch"
    devices = ["--gpus-per-node", "1"] if ctx.gpu else ["--gpus-per-node", "0", "--tasks-per-node", "1"]
    cmd = [ctx.music2vec, "launch", str(TINY), f"data.shards={ctx.tiny_shards}", f"train.run_dir={run_dir}"]
    cmd += [f"train.precision={ctx.precision}", "optim.max_updates=30", "train.checkpoint_every=100"]
    cmd += ["--executor", "local", "--cpus-per-task", "2", "--time", "20", *devices]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(metrics(run_dir)) < 5 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    rank0 = next(event["pid"] for event in reversed(read_events(run_dir)) if event["event"] == "started")
    os.kill(int(rank0), signal.SIGUSR2)
    output, _ = launcher.communicate(timeout=300)
    print(output[-4000:])
    reasons = [event.get("reason") for event in read_events(run_dir) if event["event"] == "ended"]
    steps = [entry["step"] for entry in metrics(run_dir)]
    device = "cuda" if ctx.gpu else "cpu"  # with NCCL on a GPU, gloo on the CPU
    trained_there = f"done on {device}" in output
    ok = launcher.returncode == 0 and reasons == ["requeue (SIGUSR2)", "done"] and steps == list(range(1, 31))
    summary = f"attempts ended: {reasons}; steps 1..{max(steps, default=0)}; trained on {device}: {trained_there}"
    return passed_if(ok and trained_there, summary)


def check_probe_features(ctx: Context) -> dict[str, Any]:
    """Features of `base` (random init) on demo music: GPU fp32 and bf16 against the CPU's fp32."""
    import torch

    from data.demo import write_demo_corpus
    from model import Music2Vec, preset
    from probes.features import extract

    files = [str(p) for p in write_demo_corpus(ctx.workdir / "probe_audio", clips=4, seconds=30.0)]
    torch.manual_seed(0)
    encoder = Music2Vec(preset("base")).encoder
    reference = extract(encoder, files, progress=False).values  # CPU, fp32
    variants = (
        {"cpu_bf16": ("cpu", "bf16")} if not ctx.gpu else {"gpu_fp32": ("cuda", "fp32"), "gpu_bf16": ("cuda", "bf16")}
    )
    errors, seconds = {}, {}
    for name, (device, precision) in variants.items():
        encoder.to(device)
        started = time.perf_counter()
        values = extract(encoder, files, precision=precision, progress=False).values
        seconds[name] = round(time.perf_counter() - started, 2)
        relative = (values - reference).norm(dim=-1) / reference.norm(dim=-1)  # per window and hidden state
        errors[name] = float(relative.max())
    limits = {"gpu_fp32": 1e-2, "gpu_bf16": 5e-2, "cpu_bf16": 5e-2}
    ok = all(error < limits[name] for name, error in errors.items())
    summary = ", ".join(f"{name} vs CPU fp32: {error:.1e}" for name, error in errors.items())
    return passed_if(ok, summary, relative_error=errors, seconds=seconds)


def check_pinned_batches(ctx: Context) -> dict[str, Any]:
    from dataclasses import replace

    from data import StreamingLoader
    from trainer.config import load_config

    cfg = load_config(TINY, [f"data.shards={ctx.tiny_shards}"])
    loader = StreamingLoader(replace(cfg.data, workers=2), frames=cfg.model.num_frames(32_000), rank=0, world_size=1)
    batch = next(iter(loader))
    pinned = batch.audio.is_pinned() and batch.mask.is_pinned()
    return passed_if(pinned, "the loader's batches are page-locked" if pinned else "batches are not pinned")


def check_paper_recipe(ctx: Context) -> dict[str, Any]:
    """`base`, bf16, ZeRO-2, 96 x 5 s per GPU, the loader workers `cluster.cpus_per_task` gives a launched task:
    memory against a 40 GB A100, how long the loader keeps the GPU waiting, and audio-seconds per second."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.config import load_job_config
    from data import ShardParams, write_shards
    from data.demo import write_demo_corpus

    shards = ctx.workdir / "paper_shards"
    write_demo_corpus(ctx.workdir / "paper_audio", clips=48, seconds=30.0)
    write_shards([str(ctx.workdir / "paper_audio")], shards, ShardParams(max_count=3), jobs=os.cpu_count() or 1)
    experiment, cluster = load_job_config(BASE)
    workers = experiment.data.sized_for(cluster.cpus_per_task).workers
    run_dir = ctx.workdir / "paper_recipe"
    overrides = ["optim.max_updates=25", "train.checkpoint_every=1000", "train.log_every=5", f"data.workers={workers}"]
    cmd = [ctx.music2vec, "train", str(BASE), f"data.shards={shards / 'manifest.json'}", f"train.run_dir={run_dir}"]
    result = run([*cmd, *overrides])
    steady = metrics(run_dir)[5:]  # past start-up: the first batches wait for workers to start
    if result.returncode != 0 or not steady:
        return outcome("failed", f"exit {result.returncode}")
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    reserved = max(event.value for event in events.Scalars("system/gpu_max_reserved_gb"))
    allocated = max(event.value for event in events.Scalars("system/gpu_max_allocated_gb"))
    rate = sorted(entry["audio_seconds_per_s"] for entry in steady)[len(steady) // 2]
    wait = sum(entry["data_wait_fraction"] for entry in steady) / len(steady)
    summary = (
        f"{rate:.0f} audio-s/s per GPU; data wait {wait:.1%} with {workers} workers; peak {allocated:.1f} GiB"
        f" allocated, {reserved:.1f} GiB reserved (a 40 GB A100 leaves about {A100_USABLE_GIB:.0f})"
    )
    details = {"audio_seconds_per_s": rate, "data_wait_fraction": wait, "workers": workers, "allocated_gib": allocated}
    finite = all(math.isfinite(entry["loss"]) for entry in metrics(run_dir))  # still in warm-up: no trend yet
    return passed_if(reserved < A100_USABLE_GIB and finite, summary, **details)


def bench(ctx: Context, script: str, *args: str) -> dict[str, Any]:
    result = run([ctx.python, str(REPO / "bench" / script), *args], timeout=300)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return passed_if(result.returncode == 0, " | ".join(lines[-4:]), output=lines)


def check_bench_train_step(ctx: Context) -> dict[str, Any]:
    """The engine against plain PyTorch at the paper's batch, MFU and the 8 x A100 projection, and in the same
    rotation the engine with train.deterministic: what bitwise resume costs."""
    args = ["--precision", "bf16", "--batch", "96", "--iters", "5", "--versus", "deterministic"]
    return bench(ctx, "train_step.py", *args)


def check_bench_model_step(ctx: Context) -> dict[str, Any]:
    return bench(ctx, "model_step.py", "--dtype", "bf16", "--batch", "8", "--iters", "5")


def check_bench_ema(ctx: Context) -> dict[str, Any]:
    return bench(ctx, "ema.py")


def check_compile(ctx: Context) -> dict[str, Any]:
    """train.compile: the tiny model's losses with and without (dropout off, so that both draw the same LayerDrop
    layers), and the engine's update at the paper's batch compiled against uncompiled."""
    losses = {}
    for compiled in ("false", "true"):
        run_dir = ctx.workdir / f"compile_{compiled}"
        extra = ["optim.max_updates=8", "model.layerdrop=0.5", "model.dropout=0", "model.attention_dropout=0"]
        run(train_command(ctx, run_dir, *extra, f"train.compile={compiled}"))
        losses[compiled] = [entry["loss"] for entry in metrics(run_dir)]
    pairs = list(zip(losses["true"], losses["false"], strict=False))
    difference = max((abs(a - b) / abs(b) for a, b in pairs), default=float("inf"))
    speed = bench(ctx, "train_step.py", "--precision", "bf16", "--batch", "96", "--iters", "5", "--versus", "compile")
    ok = len(pairs) == 8 and difference < 2e-2 and speed["status"] == "passed"
    return passed_if(ok, f"losses within {difference:.1e} of uncompiled; {speed['summary']}", losses=losses)


def check_fp32_reduce_cost(ctx: Context) -> dict[str, Any]:
    """Two micro-batches of 48: the templates' fp32 reduction and accumulation against DeepSpeed's bf16 default."""
    args = ["--precision", "bf16", "--batch", "48", "--grad-accum", "2", "--iters", "5", "--versus", "bf16-reduce"]
    return bench(ctx, "train_step.py", *args)


def check_quick_tests(ctx: Context, seconds: float) -> dict[str, Any]:
    """The quicker test files with the GPU visible, for what time is left: which fail there, and why."""
    cmd = [ctx.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=", *QUICK_TEST_FILES]
    try:
        result = run(cmd, timeout=seconds)
    except subprocess.TimeoutExpired:
        return outcome("failed", f"not finished in {seconds:.0f} s")
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    return passed_if(result.returncode == 0, last, failures=failures)


CHECKS = (
    Check("environment", "torch, CUDA, driver, GPU, bf16, DeepSpeed and its prebuilt ops", 15),
    Check("data", "tiny demo shards for the checks", 10),
    Check("optimizer_without_compiler", "training with no CUDA_HOME, nvcc or C++ compiler builds nothing", 30),
    Check("train", "tiny model, ZeRO 1/2/3 x bf16/fp16/fp32: loss, loss scale, teacher, export, memory", 100),
    Check("flash_attention", "base bf16 forward+backward with SDPA limited to flash", 30, gpu_only=True),
    Check("resume", "kill -9 and resume: bitwise with train.deterministic, close without", 80),
    Check("gpu_per_task", "one GPU bound per task: local rank 1 trains on cuda:0", 30, gpu_only=True),
    Check("launch_requeue", "launch --executor local: USR2, checkpoint, requeue, finish", 70),
    Check("probe_features", "probe features on the GPU (fp32, bf16) against the CPU", 40),
    Check("pinned_batches", "the loader hands out page-locked batches", 20, gpu_only=True),
    Check("paper_recipe", "base, bf16, ZeRO-2, 96 x 5 s: memory, data wait, audio-s/s", 70, gpu_only=True, alone=True),
    Check("bench_train_step", "bench/train_step.py: overhead, MFU, 8 x A100 days, deterministic", 60, True, True),
    Check("bench_model_step", "bench/model_step.py: ours vs transformers in bf16", 35, gpu_only=True, alone=True),
    Check("bench_ema", "bench/ema.py: fused EMA vs loop vs memory floor", 20, gpu_only=True, alone=True),
    Check("compile", "train.compile: losses vs uncompiled, speed at the paper's batch", 150, True, True),
    Check("fp32_reduce_cost", "fp32 gradient reduction and accumulation against bf16: the cost", 60, True, True),
)
RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "environment": check_environment,
    "data": check_data,
    "optimizer_without_compiler": check_optimizer_without_compiler,
    "train": check_train,
    "flash_attention": check_flash_attention,
    "resume": check_resume,
    "gpu_per_task": check_gpu_per_task,
    "launch_requeue": check_launch_requeue,
    "probe_features": check_probe_features,
    "pinned_batches": check_pinned_batches,
    "paper_recipe": check_paper_recipe,
    "bench_train_step": check_bench_train_step,
    "bench_model_step": check_bench_model_step,
    "bench_ema": check_bench_ema,
    "compile": check_compile,
    "fp32_reduce_cost": check_fp32_reduce_cost,
}


# --- the install: a venv over the machine's Python, offline ------------------------------------------------------


def install(venv: Path, wheels: Path) -> dict[str, Any]:
    """The project (editable) and the wheels it needs into `venv`, which sees this Python's packages too.

    `venv --system-site-packages` would show the packages of the *base* interpreter, not those of this one, and
    the GPU machine's python3 is itself a venv; a .pth file that adds this interpreter's site folders does it."""
    created = run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)])
    if created.returncode != 0:
        return outcome("failed", f"no venv at {venv}: {created.stderr.strip()[-300:]}")
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    host = [folder for folder in sys.path if folder.endswith(("site-packages", "dist-packages"))]
    lines = [f"import site; site.addsitedir({folder!r})" for folder in host]  # its own .pth files run too
    (Path(purelib) / "_host_packages.pth").write_text("\n".join(lines) + "\n")
    # pip and setuptools are this Python's own; every other missing package must come from `wheels`
    cmd = [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-build-isolation"]
    result = run([*cmd, "--disable-pip-version-check", "-e", f"{REPO}[test]"], timeout=300)
    if result.returncode != 0:
        missing = [line for line in result.stderr.splitlines() if "No matching distribution" in line]
        hint = f"; carry {wheels} (make gpu-wheels)" if missing else ""
        return outcome("failed", (missing or result.stderr.strip().splitlines() or ["pip failed"])[-1] + hint)
    imports = "import deepspeed, webdataset, submitit, omegaconf, soundfile, mir_eval, torch; print(torch.__file__)"
    probe = run([python, "-c", imports])
    installed = [word for line in result.stdout.splitlines() if line.startswith("Successfully installed")
                 for word in line.split()[2:]]  # fmt: skip
    torch_from = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "nowhere"
    ok = probe.returncode == 0 and (venv / "bin" / "music2vec").is_file()
    return passed_if(ok, f"installed {' '.join(installed)}; torch from {torch_from}")


# --- the orchestration ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    status: str  # passed, failed, skipped
    seconds: float
    summary: str
    details: dict[str, Any]


def run_check(check: Check, ctx: Context, log: Path, timeout: float) -> Result:
    """One check in its own process of the check venv's Python; its output goes to `log`."""
    out = ctx.workdir / f"{check.name}.json"
    cmd = [ctx.python, str(Path(__file__).resolve()), "--check", check.name, "--context", str(ctx.workdir)]
    started = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    seconds = time.monotonic() - started
    if out.is_file():
        found = json.loads(out.read_text())
        return Result(check.name, found["status"], seconds, found["summary"], found["details"])
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    reason = f"killed after {timeout:.0f} s" if seconds >= timeout else f"crashed: {' '.join(tail)[-300:]}"
    return Result(check.name, "failed", seconds, reason, {})


def check_process(name: str, workdir: Path) -> None:
    """The body of one check's process: run it, and write its outcome where the orchestrator looks."""
    ctx = read_context(workdir)
    sys.path.insert(0, str(REPO))
    try:
        found = RUNNERS[name](ctx)
    except Exception as error:  # noqa: BLE001 - a check's failure is its outcome, whatever it was
        import traceback

        traceback.print_exc()
        found = outcome("failed", f"{type(error).__name__}: {error}"[:500])
    (workdir / f"{name}.json").write_text(json.dumps(found, default=str))


def write_context(ctx: Context) -> None:
    spec = {"venv": str(ctx.venv), "gpu": ctx.gpu, "quick": ctx.quick}
    (ctx.workdir / "context.json").write_text(json.dumps(spec))


def read_context(workdir: Path) -> Context:
    spec = json.loads((workdir / "context.json").read_text())
    return Context(workdir, Path(spec["venv"]), spec["gpu"], spec["quick"])


class Suite:
    """Runs the checks against the budget and collects their results."""

    def __init__(self, ctx: Context, budget_s: float, only: set[str] | None) -> None:
        self.ctx = ctx
        self.deadline = time.monotonic() + budget_s
        self.only = only
        self.results: list[Result] = []
        (ctx.workdir / "logs").mkdir(exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wanted(self, check: Check) -> bool:
        return self.only is None or check.name in self.only

    def start(self, check: Check) -> Result:
        if check.gpu_only and not self.ctx.gpu:
            return Result(check.name, "skipped", 0.0, "needs a GPU", {})
        if self.left() < check.cost_s:
            return Result(check.name, "skipped", 0.0, f"not started: {self.left():.0f} s of the budget left", {})
        print(f"[{time.strftime('%H:%M:%S')}] {check.name}: {check.what}", flush=True)
        # On a GPU a hung check must not take the others' time; a CPU rehearsal is slower than every estimate.
        timeout = min(self.left(), max(3 * check.cost_s, 120)) if self.ctx.gpu else self.left()
        result = run_check(check, self.ctx, self.ctx.workdir / "logs" / f"{check.name}.log", timeout=timeout)
        print(f"[{time.strftime('%H:%M:%S')}] {check.name}: {result.status} ({result.seconds:.0f} s) {result.summary}")
        return result

    def run(self, checks: list[Check]) -> None:
        checks = [check for check in checks if self.wanted(check)]
        first = [check for check in checks if check.name in ("environment", "data")]
        shared = [check for check in checks if check not in first and not check.alone]
        alone = [check for check in checks if check.alone]
        for check in first:
            self.results.append(self.start(check))
        with ThreadPoolExecutor(max_workers=4) as pool:  # correctness checks share the GPU
            self.results += pool.map(self.start, shared)
        for check in alone:  # timings have it to themselves
            self.results.append(self.start(check))
        if self.only is None or "quick_tests" in self.only:
            self.results.append(self.quick_tests())

    def quick_tests(self) -> Result:
        if not self.ctx.gpu:
            return Result("quick_tests", "skipped", 0.0, "the CPU runs them in the test suite", {})
        if self.left() < 60:
            return Result("quick_tests", "skipped", 0.0, f"not started: {self.left():.0f} s of the budget left", {})
        started = time.monotonic()
        found = check_quick_tests(self.ctx, seconds=self.left())
        seconds = time.monotonic() - started
        return Result("quick_tests", found["status"], seconds, found["summary"], found["details"])


def report(results: list[Result], out: Path, ctx: Context, logs: Path) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    mode = "GPU" if ctx.gpu else "rehearsal on the CPU (no GPU)"
    ok = all(result.status != "failed" for result in results)
    document = {
        "mode": mode,
        "passed": ok,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "checks": [asdict(r) for r in results],
    }
    (out / "gpu_check.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    rows = [f"| {r.name} | {r.status} | {r.seconds:.0f} s | {r.summary.replace('|', '/')} |" for r in results]
    table = "\n".join(["| check | status | time | result |", "|---|---|---|---|", *rows])
    (out / "gpu_check.md").write_text(f"# make gpu-check: {mode}, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    with (out / "gpu_check.log").open("w") as handle:
        for log in sorted(logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            handle.write(f"===== {log.stem} (last 80 lines)\n" + "\n".join(lines[-80:]) + "\n")
    print(table)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where gpu_check.json, .md and .log go")
    parser.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="from make gpu-wheels")
    parser.add_argument("--venv", type=Path, default=REPO / ".gpu-venv")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything (default: %(default)s)")
    parser.add_argument("--only", help="comma-separated checks (install and environment always run)")
    parser.add_argument("--quick", action="store_true", help="one configuration where a check has several")
    parser.add_argument("--check", help=argparse.SUPPRESS)  # inside a check's own process
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        check_process(args.check, args.context)
        return
    if args.out is None:
        parser.error("--out is required")
    started = time.monotonic()
    found = install(args.venv, args.wheels)
    results = [Result("install", found["status"], time.monotonic() - started, found["summary"], found["details"])]
    ctx = Context(Path(tempfile.mkdtemp(prefix="gpu-check-")), args.venv, has_gpu(args.venv), args.quick)
    write_context(ctx)
    if found["status"] == "passed":
        only = {"environment", "data", *args.only.split(",")} if args.only else None
        suite = Suite(ctx, args.budget - (time.monotonic() - started), only)
        suite.run(list(CHECKS))
        results += suite.results
    sys.exit(0 if report(results, args.out, ctx, ctx.workdir / "logs") else 1)


def has_gpu(venv: Path) -> bool:
    """Whether the check venv's torch can use a GPU; without one the suite rehearses on the CPU."""
    probe = [str(venv / "bin" / "python"), "-c", "import sys, torch; sys.exit(not torch.cuda.is_available())"]
    return (venv / "bin" / "python").is_file() and subprocess.run(probe, check=False).returncode == 0


if __name__ == "__main__":
    main()
