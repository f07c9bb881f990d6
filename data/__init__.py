"""Data: shards from raw audio, the streaming crop-and-mask loader, span masks, demo music rendered from scores."""

from data.config import DataConfig
from data.loader import SKIP_REASONS, Batch, StreamingLoader, shard_urls
from data.masking import span_mask
from data.shards import ShardParams, write_shards

__all__ = [
    "SKIP_REASONS",
    "Batch",
    "DataConfig",
    "ShardParams",
    "StreamingLoader",
    "shard_urls",
    "span_mask",
    "write_shards",
]
