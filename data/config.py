"""Data configuration: where the shards are, how clips become batches, and the span-mask parameters."""

from __future__ import annotations

from dataclasses import dataclass, replace

AUTO_WORKERS = -1  # data.workers=-1: sized from the CPUs each rank has (see `DataConfig.sized_for`)
MAX_AUTO_WORKERS = 8  # more workers add shuffle-buffer memory (~0.5 GB each at 1000 clips) and no throughput


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # a manifest.json written by `music2vec shard`, or a brace-expanded URL pattern
    batch_size: int = 8  # crops per batch on each rank
    crop_seconds: float = 5.0  # the paper's best setting; fairseq's max_sample_size / 16000
    crops_per_clip: int = 4  # crops cut from one decoded clip, so one decode feeds several samples
    shuffle_buffer: int = 1000  # records held by each worker's shuffle buffer
    resample: bool = False  # draw shards with replacement instead of splitting them (needed: shards < streams)
    workers: int = AUTO_WORKERS  # DataLoader worker processes per rank; -1: from the rank's CPUs
    seed: int = 1  # shard order, shuffle buffers, crops and masks all derive from it
    mask_prob: float = 0.65  # model.mask_prob: probability of a frame starting a span
    mask_length: int = 10  # model.mask_length: frames per span
    min_spans: int = 1  # min_masks in compute_mask_indices: every sample gets at least this many spans

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1"),
            (self.crop_seconds > 0, f"data.crop_seconds={self.crop_seconds} must be positive"),
            (self.crops_per_clip >= 1, f"data.crops_per_clip={self.crops_per_clip} must be >= 1"),
            (self.shuffle_buffer >= 1, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 1"),
            (self.workers >= AUTO_WORKERS, f"data.workers={self.workers} must be >= 0, or -1 for one per spare CPU"),
            (0 < self.mask_prob < 1, f"data.mask_prob={self.mask_prob} must be in (0, 1)"),
            (self.mask_length >= 1, f"data.mask_length={self.mask_length} must be >= 1"),
            (self.min_spans >= 0, f"data.min_spans={self.min_spans} must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("invalid data config: " + "; ".join(problems))

    def sized_for(self, cpus: int) -> DataConfig:
        """`workers=-1` resolved for a rank that owns `cpus` CPUs: one runs the training process, the rest decode."""
        if self.workers != AUTO_WORKERS:
            return self
        return replace(self, workers=max(1, min(MAX_AUTO_WORKERS, cpus - 1)))
