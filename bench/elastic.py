"""What an elastic resume costs the loader: finding which clips the old streams had not taken.

The plan replays every old stream's shuffle on record keys, which it reads from tar headers (seeking past the
audio) instead of reading the shards whole as the exact resume's replay does. Three timings on the same shards:

- keys from headers, every shard once (what the plan reads at most, per rank);
- keys from a full read of every shard (the baseline: the plan without the header reader);
- the whole plan, `continue_elastically`, for a run of `--old` ranks x `--workers` workers stopped half-way through
  its first epoch, continued on `--new` ranks (one new rank's share; every rank computes the same plan).

Shards are written once from demo music into --cache. The files are in the page cache after the first
pass, so the full read is measured at its fastest; on a network filesystem the gap is wider.

    python bench/elastic.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from loader import ensure_shards

from data import DataConfig, StreamingLoader, shard_urls
from data.loader import StreamPosition, _read_shard, shard_keys
from model.config import num_frames

T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def half_way_states(manifest: Path, old: int, workers: int, records: int) -> list[dict[str, Any]]:
    """The loader states of `old` ranks whose every stream has taken `records` records of epoch 0, as a checkpoint
    taken half-way through the epoch holds them."""
    position = StreamPosition(epoch=0, records=records, crops=1, batches=records).to_dict()
    identity = {"seed": 1, "shards": len(shard_urls(str(manifest))), "world_size": old, "workers": workers}
    return [
        {
            "identity": identity | {"rank": rank},
            "streams": dict.fromkeys(range(workers), position),
            "next_stream": 0,
            "continued": {},
        }
        for rank in range(old)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "music2vec-bench-elastic"))
    parser.add_argument("--clips", type=int, default=160, help="30 s demo clips in the shard set")
    parser.add_argument("--old", type=int, default=4, help="ranks that wrote the checkpoint")
    parser.add_argument("--new", type=int, default=2, help="ranks that continue it")
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank, before and after")
    args = parser.parse_args()

    manifest = ensure_shards(Path(args.cache), args.clips)
    urls = shard_urls(str(manifest))
    gigabytes = sum(Path(url).stat().st_size for url in urls) / 1e9
    full_keys, full_s = timed(lambda: [[r["__key__"] for r in _read_shard(url, Counter())] for url in urls])
    header_keys, header_s = timed(lambda: [shard_keys(url) for url in urls])
    assert header_keys == full_keys, "the header reader must give the keys of a full read"

    streams = args.old * args.workers
    records = args.clips // streams // 2
    cfg = DataConfig(shards=str(manifest), workers=args.workers, seed=1, batch_size=8, crops_per_clip=4)
    loader = StreamingLoader(cfg, frames=num_frames(5 * 16_000), rank=0, world_size=args.new)
    said, plan_s = timed(
        lambda: loader.continue_elastically(half_way_states(manifest, args.old, args.workers, records))
    )

    print(f"{len(urls)} shards, {args.clips} clips, {gigabytes:.2f} GB")
    print(f"keys, full read:      {full_s:7.3f} s (baseline)")
    print(f"keys, tar headers:    {header_s:7.3f} s = {header_s / full_s:.3f}x the full read")
    layouts = f"{args.old}x{args.workers} -> {args.new}x{args.workers}"
    print(f"plan {layouts}:   {plan_s:7.3f} s = {plan_s / full_s:.3f}x the full read; {said}")


if __name__ == "__main__":
    main()
