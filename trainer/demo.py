"""`music2vec demo`, the embedded default job: rendered compositions -> shards -> the tiny model trained with DeepSpeed
-> the nightly probe job on the demo tasks, beside the same model at its random initialization.

Everything lands under one folder (runs/demo by default); running the demo again reuses what is there, so a second
run only prints the summary. An entry point, like trainer.cli: it reaches every package, and nothing imports it
but the command line.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from cluster.environment import from_environment, init_distributed
from data import ShardParams, write_shards
from data.demo import write_demo_corpus
from probes.datasets import demo as demo_tasks
from probes.nightly import nightly, read_results
from probes.probe import ProbeSettings
from trainer.config import ExperimentConfig, load_config
from trainer.layout import CHECKPOINTS, EXPORTS, METRICS, PROBE_REPORT, PROBE_RESULTS, TENSORBOARD, latest_complete
from trainer.metrics import read_metrics
from trainer.train import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def prepare_shards(out: Path, clips: int) -> Path:
    manifest = out / "shards" / "manifest.json"
    if not manifest.is_file():
        print(f"writing {clips} excerpts of compositions from music21's corpus to {out / 'audio'} ...")
        write_demo_corpus(out / "audio", clips, seed=0, seconds=30.0)
        write_shards([str(out / "audio")], out / "shards", ShardParams(max_count=8), jobs=2)
    return manifest


PROBE_SEEDS = (0, 1, 2)


def run_demo(out: Path, *, clips: int, steps: int, seed: int = 1, probes: bool = True) -> Path:
    """The demo's run directory, trained (unless a finished demo is already there) and probed. `seed` is the
    pretraining's: the model's initialisation, and the crops and masks the loader draws."""
    manifest = prepare_shards(out, clips)
    overrides = [f"data.shards={manifest}", f"train.run_dir={out / 'run'}", f"optim.max_updates={steps}"]
    overrides += [f"train.seed={seed}", f"data.seed={seed}", "train.keep_last=1"]  # the probes score the last
    cfg = load_config(TINY, overrides)
    run_dir = Path(cfg.train.run_dir)
    done = latest_complete(run_dir)
    device = None
    if done is None or done[0] != steps:  # a finished demo is only summarised again, without starting DeepSpeed
        init_distributed(from_environment())
        device = train(cfg).device
    report(run_dir, device)
    if probes:
        probe_demo(cfg, out)
        report_probes(run_dir)
    return run_dir


def probe_demo(cfg: ExperimentConfig, out: Path) -> None:
    """The nightly job on the run: every COMPLETE checkpoint once, and the model as it was before its first update
    (step 0, the report's reference line): what pretraining added is the difference."""
    settings = ProbeSettings(
        data_root=out / "probe_data",
        seeds=PROBE_SEEDS,
        cache=out / "feature_cache",
        progress=sys.stderr.isatty(),
        random_init=True,
    )
    print(f"\nprobing every checkpoint and the random init on {', '.join(demo_tasks.TASKS)} ...")
    nightly(Path(cfg.train.run_dir), list(demo_tasks.TASKS), settings)


def report_probes(run_dir: Path) -> None:
    rows = read_results(run_dir)
    last = max(row["step"] for row in rows)
    print(f"\nprobes on the demo tasks' test clips, mean ± std over {len(PROBE_SEEDS)} seeds")
    print(f"  {'task':<18} {'metric':<16} {f'update {last}':>16} {'random init':>16}")
    for task in demo_tasks.TASKS:
        metric = demo_tasks.TASKS[task].monitor
        pretrained = mean_and_spread(rows, task, metric, step=last)
        untrained = mean_and_spread(rows, task, metric, step=0)
        print(f"  {task:<18} {metric:<16} {pretrained:>16} {untrained:>16}")
    print(f"  results     {run_dir / PROBE_RESULTS}")
    print(f"  report      {run_dir / PROBE_REPORT} and report.png; probe/<task>/<metric> in TensorBoard")


def mean_and_spread(rows: list[dict[str, Any]], task: str, metric: str, *, step: int) -> str:
    """'mean ± std' of a task's metric over the probe seeds, at one checkpoint's step."""
    values = [row["value"] for row in rows if (row["task"], row["metric"], row["step"]) == (task, metric, step)]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def report(run_dir: Path, device: str | None) -> None:
    """The run's summary; `device` is what it trained on, when this process trained it."""
    metrics = read_metrics(run_dir)
    first, last = metrics[0], metrics[-1]
    where = f" on {device}" if device else ""
    print()
    print(f"trained the tiny model for {last['step']} updates{where} with DeepSpeed ZeRO-2")
    print(f"  loss        {first['loss']:.3f} at update 1 -> {last['loss']:.3f} at update {last['step']}")
    print(f"  target_var  {first['target_var']:.3f} -> {last['target_var']:.3f}")
    print(f"  throughput  {last['audio_seconds_per_s']:.0f} audio-seconds/s (last update)")
    print(f"  checkpoints {run_dir / CHECKPOINTS}")
    print(f"  exports     {run_dir / EXPORTS}  (Hugging Face Data2VecAudioModel folders)")
    print(f"  metrics     {run_dir / METRICS}")
    print(f"  TensorBoard: tensorboard --logdir {run_dir / TENSORBOARD}")
