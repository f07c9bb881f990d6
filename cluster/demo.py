"""`music2vec demo`, the embedded default job: procedural music -> shards -> the tiny model trained with DeepSpeed.

Everything lands under one folder (runs/demo by default); running the demo again reuses what is there, so a second
run only prints the summary.
"""

from __future__ import annotations

from pathlib import Path

from cluster.environment import from_environment, init_distributed
from data import ShardParams, write_shards
from data.demo import write_demo_corpus
from trainer.config import load_config
from trainer.metrics import read_metrics
from trainer.train import TrainSummary, train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def prepare_shards(out: Path, clips: int) -> Path:
    manifest = out / "shards" / "manifest.json"
    if not manifest.is_file():
        print(f"writing {clips} pieces of procedural music to {out / 'audio'} ...")
        write_demo_corpus(out / "audio", clips, seed=0, seconds=30.0)
        write_shards([str(out / "audio")], out / "shards", ShardParams(max_count=8), jobs=2)
    return manifest


def run_demo(out: Path, *, clips: int, steps: int) -> TrainSummary:
    manifest = prepare_shards(out, clips)
    overrides = [f"data.shards={manifest}", f"train.run_dir={out / 'run'}", f"optim.max_updates={steps}"]
    cfg = load_config(TINY, overrides)
    init_distributed(from_environment())
    summary = train(cfg)
    report(summary)
    return summary


def report(summary: TrainSummary) -> None:
    metrics = read_metrics(summary.run_dir)
    first, last = metrics[0], metrics[-1]
    print()
    print(f"trained the tiny model for {last['step']} updates on CPU with DeepSpeed ZeRO-2")
    print(f"  loss        {first['loss']:.3f} at update 1 -> {last['loss']:.3f} at update {last['step']}")
    print(f"  target_var  {first['target_var']:.3f} -> {last['target_var']:.3f}")
    print(f"  throughput  {last['audio_seconds_per_s']:.0f} audio-seconds/s (last update)")
    print(f"  checkpoints {summary.run_dir / 'checkpoints'}")
    print(f"  exports     {summary.run_dir / 'exports'}  (Hugging Face Data2VecAudioModel folders)")
    print(f"  metrics     {summary.run_dir / 'metrics.jsonl'}")
    print(f"  TensorBoard: tensorboard --logdir {summary.run_dir / 'tb'}")
    print("  (probing the checkpoints on the demo tasks joins this summary when the probes land)")
