"""What opt-in features build when a run starts, and whether this machine can: checked before anything starts.

The default training path builds nothing: torch's fused AdamW ships compiled with torch. Two options compile code at
the start of every run: ZeRO-Offload (DeepSpeed's CPU Adam, from C++ source, unless DeepSpeed was installed with
DS_BUILD_CPU_ADAM=1) and `train.compile` (torch.compile: a small C launcher per kernel on GPUs, C++ on the CPU).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from trainer.config import ExperimentConfig


def check_toolchain(cfg: ExperimentConfig, *, on_gpu: bool) -> None:
    """Refuse, naming what is missing, a config whose opt-in features this machine could not build."""
    if cfg.train.offload:
        check_offload_buildable()
    if cfg.train.compile:
        check_compile_toolchain(on_gpu=on_gpu)


def check_offload_buildable() -> None:
    """ZeRO-Offload steps with DeepSpeed's CPU Adam, which DeepSpeed compiles with the host's C++ compiler and ninja
    when the run starts (about a minute; cached under TORCH_EXTENSIONS_DIR)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam"):
        return
    compiler = os.environ.get("CXX", "c++")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [
        what
        for what, present in (
            (f"a C++ compiler ({compiler}; CXX names another)", shutil.which(compiler)),
            ("ninja on PATH (pip install ninja)", shutil.which("ninja")),
            (f"Python's headers ({headers})", headers.is_file()),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            "train.offload=true: DeepSpeed compiles its CPU Adam from C++ when the run starts, and this machine lacks "
            + ", ".join(missing)
            + "; install them, or DeepSpeed with DS_BUILD_CPU_ADAM=1, or set train.offload=false"
        )


def check_compile_toolchain(*, on_gpu: bool) -> None:
    """torch.compile builds code when the run starts: a C launcher per kernel on GPUs (Triton), C++ on the CPU."""
    variable, candidates = ("CC", ("cc", "gcc", "clang")) if on_gpu else ("CXX", ("c++", "g++", "clang++"))
    named = os.environ.get(variable)
    if not any(shutil.which(compiler) for compiler in ([named] if named else candidates)):
        language = "C" if on_gpu else "C++"
        raise ValueError(
            f"train.compile=true needs a {language} compiler ({variable}, or one of {', '.join(candidates)} on PATH):"
            " torch.compile builds its kernels when the run starts; install one, or set train.compile=false"
        )
