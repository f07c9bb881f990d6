"""Data: shards from raw audio, the streaming crop-and-mask loader, span masks, procedural demo music."""

from data.masking import span_mask

__all__ = ["span_mask"]
