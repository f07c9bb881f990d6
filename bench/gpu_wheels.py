"""Wheels of the dependencies a GPU machine's Python lacks, for an install there with no network (`make gpu-wheels`).

The GPU machines this project is checked on run Python 3.12 with torch, its CUDA stack and most scientific packages
preinstalled, and cannot reach PyPI. This writes, for that Python and x86-64 Linux, a wheel of every package below
at the version this environment resolved, so both sides run the same code; a package PyPI has only as source
(DeepSpeed, whose wheel is pure Python when built without ops) is built into a wheel here. torch and everything
that comes with it stay the machine's own.

    python bench/gpu_wheels.py --out .gpu-wheels [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# The project's dependencies (and theirs) that the GPU image does not carry; torch, numpy, scipy, scikit-learn,
# matplotlib, tensorboard, transformers, safetensors, tqdm, PyYAML, psutil, msgpack and ninja are there.
CARRIED = (
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "py-cpuinfo",
    "webdataset",
    "braceexpand",
    "submitit",
    "omegaconf",
    "soundfile",
    "cffi",
    "pycparser",
    "mir_eval",
    "decorator",
    "music21",
    "chardet",
    "jsonpickle",
    "more-itertools",
    "webcolors",
    "requests",
    "charset-normalizer",
    "idna",
    "urllib3",
    "certifi",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


def fetch(name: str, out: Path, python_version: str) -> str:
    """A wheel of `name` at this environment's version for the target Python: PyPI's, or built here if pure."""
    requirement = f"{name}=={version(name)}"
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    abi = f"cp{python_version.replace('.', '')}"
    download = pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation",
        "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms, "--dest", str(out), requirement,
    )  # fmt: skip
    if download.returncode == 0:
        return "downloaded"
    # No wheel on PyPI: build one without build isolation (DeepSpeed's setup imports this environment's torch).
    built = pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), requirement)
    if built.returncode != 0:
        raise SystemExit(f"{requirement}: no wheel for Python {python_version}, none could be built:\n{built.stderr}")
    wheel = max(out.glob(f"{name.replace('-', '_')}-*.whl"), key=lambda path: path.stat().st_mtime)
    if not wheel.name.endswith("-none-any.whl"):
        raise SystemExit(f"{wheel.name}: built for this machine's Python, not pure; it would not install there")
    return "built here"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpu-wheels"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: %(default)s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        print(f"{name:20} {version(name):12} {fetch(name, args.out, args.python_version)}", flush=True)
    total = sum(path.stat().st_size for path in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
