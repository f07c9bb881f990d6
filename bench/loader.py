"""Loader throughput: the whole per-worker pipeline vs plain soundfile decoding of the same shards.

Both passes read the same shards in one process (one worker's work, no DataLoader processes) and count seconds of
*clip* audio they get through per second of wall time. The loader pass also reads the tar, shuffles, normalises
each clip, cuts `crops_per_clip` crops, stacks batches and draws span masks; the goal is at least 0.8 of the
decode-only rate. Shards are written once from demo music into --cache.

    python bench/loader.py
"""

from __future__ import annotations

import argparse
import io
import itertools
import tempfile
import time
from pathlib import Path

import soundfile as sf
from webdataset.tariterators import tar_file_iterator

from data import DataConfig, ShardParams, StreamingLoader, shard_urls, write_shards
from data.demo import write_demo_corpus
from model.config import num_frames


def ensure_shards(cache: Path, clips: int) -> Path:
    manifest = cache / "shards" / "manifest.json"
    if not manifest.is_file():
        write_demo_corpus(cache / "audio", clips, seed=0, seconds=30.0)
        write_shards([str(cache / "audio")], cache / "shards", ShardParams(max_count=10), jobs=2, progress=False)
    return manifest


def decode_only(urls: list[str]) -> tuple[float, float]:
    """(clip seconds decoded, wall seconds): tar read + soundfile decode, nothing else."""
    started, seconds = time.perf_counter(), 0.0
    for url in urls:
        with Path(url).open("rb") as stream:
            for member in tar_file_iterator(stream):
                if member["fname"].endswith(".flac"):
                    audio, rate = sf.read(io.BytesIO(member["data"]), dtype="float32")
                    seconds += audio.shape[0] / rate
    return seconds, time.perf_counter() - started


def loader_pass(manifest: Path, total_clips: int, crops_per_clip: int, batch: int) -> tuple[float, float]:
    """(clip seconds consumed, wall seconds) for one epoch of the loader's own pipeline."""
    cfg = DataConfig(
        shards=str(manifest), batch_size=batch, crops_per_clip=crops_per_clip, workers=0, shuffle_buffer=100
    )
    source = StreamingLoader(cfg, frames=num_frames(round(cfg.crop_seconds * 16_000)))
    batches = total_clips * crops_per_clip // batch
    started = time.perf_counter()
    for _ in itertools.islice(iter(source), batches):
        pass
    return batches * batch / crops_per_clip * 30.0, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "music2vec-bench-loader")
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--crops-per-clip", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    manifest = ensure_shards(args.cache, args.clips)
    urls = shard_urls(str(manifest))
    decode_only(urls)  # warm the page cache and the decoder
    rounds = [
        (decode_only(urls), loader_pass(manifest, args.clips, args.crops_per_clip, args.batch)) for _ in range(3)
    ]
    decode_rate = max(seconds / wall for (seconds, wall), _ in rounds)
    loader_rate = max(seconds / wall for _, (seconds, wall) in rounds)
    print(f"{args.clips} clips of 30 s in {len(urls)} shards")
    print(f"{args.crops_per_clip} crops of 5 s per clip, {args.batch} crops per batch")
    print(f"  decode only (soundfile)  {decode_rate:8.0f} audio-s/s per worker")
    print(f"  loader pipeline          {loader_rate:8.0f} audio-s/s per worker")
    print(f"  loader / decode-only: {loader_rate / decode_rate:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
