"""The `music2vec` command line: one entry point, one subcommand per way of using the system."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    run_demo(Path(args.out), clips=args.clips, steps=args.steps)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from data.shards import ShardParams, write_shards

    params = ShardParams(
        clip_seconds=args.clip_seconds,
        min_seconds=args.min_seconds,
        max_count=args.shard_max_count,
        max_bytes=int(args.shard_max_bytes),
    )
    manifest = write_shards(args.sources, args.out, params, jobs=args.jobs)
    hours = manifest["total_seconds"] / 3600
    print(
        f"{manifest['total_samples']} clips ({hours:.2f} h) in {len(manifest['shards'])} shards under {args.out};"
        f" {manifest['rejected']} inputs rejected (see {args.out}/rejected.jsonl)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from cluster.environment import from_environment, init_distributed
    from trainer.config import load_config
    from trainer.train import check_runnable, train

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process group starts
    check_runnable(cfg)
    init_distributed(from_environment())
    summary = train(cfg, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        ended = f"stopped by {summary.stopped_by}" if summary.stopped_by else "done"
        print(
            f"{ended}: updates {summary.start_step} -> {summary.end_step}, loss {summary.first_loss} ->"
            f" {summary.last_loss}, {summary.audio_seconds_per_s:.0f} audio-s/s; run directory {summary.run_dir}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="music2vec",
        description="Pretrain Music2Vec (data2vec-audio on music) with DeepSpeed and probe every checkpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="the embedded default job: procedural music -> shards -> the tiny model trained on CPU"
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the corpus, shards and run (default: %(default)s)"
    )
    demo.add_argument("--clips", type=int, default=48, help="30 s pieces of demo music (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="optimizer updates (default: %(default)s)")
    demo.set_defaults(run=_demo)

    shard = commands.add_parser(
        "shard",
        help="raw audio (files, folders, globs, list files) -> 16 kHz FLAC clips in WebDataset shards + manifest",
    )
    shard.add_argument("sources", nargs="+", metavar="SRC", help="audio files, folders, globs, or .txt path lists")
    shard.add_argument("--out", required=True, help="output folder (resumes an interrupted run into it)")
    shard.add_argument("--clip-seconds", type=float, default=30.0, help="clip length (default: %(default)s)")
    shard.add_argument(
        "--min-seconds", type=float, default=5.0, help="drop a shorter tail or file (default: %(default)s)"
    )
    shard.add_argument("--shard-max-count", type=int, default=1000, help="clips per shard (default: %(default)s)")
    shard.add_argument("--shard-max-bytes", type=float, default=1e9, help="bytes per shard (default: %(default)g)")
    shard.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    shard.set_defaults(run=_shard)

    train = commands.add_parser(
        "train", help="train on this machine: one process, or every rank under torchrun / the deepspeed launcher"
    )
    train.add_argument("config", help="experiment YAML (configs/...)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
    train.add_argument(
        "--allow-config-change", action="store_true", help="continue a run directory whose config was different"
    )
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from trainer.train import TrainingAbortedError

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Bad input: the message names the file, key or value; a traceback would only bury it.
        parser.exit(2, f"music2vec {args.command}: error: {error}\n")
    except TrainingAbortedError as error:
        parser.exit(1, f"music2vec {args.command}: aborted: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
