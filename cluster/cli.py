"""The `music2vec` command line: one entry point, one subcommand per way of using the system."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from trainer.smoke import smoke_run

    print(
        "music2vec demo: the DeepSpeed trainer has not landed yet, so this is a smoke run of the model itself:\n"
        f"the tiny preset trains {args.steps} AdamW steps on synthetic tones (span masks, student forward/backward,\n"
        "EMA-teacher targets, teacher update) on the CPU."
    )
    started = time.perf_counter()
    print(f"{'step':>5} {'loss':>9} {'target_var':>10} {'pred_var':>9} {'masked':>7} {'ema_decay':>10}")
    history = smoke_run(steps=args.steps, seed=args.seed)
    for row in history:
        print(
            f"{row['step']:>5} {row['loss']:>9.4f} {row['target_var']:>10.4f} {row['pred_var']:>9.4f}"
            f" {row['masked_fraction']:>7.1%} {row['ema_decay']:>10.6f}"
        )
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="music2vec",
        description="Pretrain Music2Vec (data2vec-audio on music) with DeepSpeed and probe every checkpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="the embedded default job: a short CPU run of the tiny model")
    demo.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
