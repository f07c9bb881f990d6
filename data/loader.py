"""The streaming crop-and-mask loader: WebDataset shards -> fixed-shape batches of normalised crops and span masks.

The data is read as *streams*, one per (rank, DataLoader worker). In epoch e, the shard list is permuted by
(seed, e) and stream c of C takes every C-th shard; it reads its shards' records in order through a shuffle buffer
seeded by (seed, e, rank, stream), decodes each record, normalises the whole clip, and cuts `crops_per_clip` random
crops (seeded by the record's key); crops fill batches, and each batch gets span masks seeded by (seed, rank,
stream, batch index). When a stream's shards run out it starts its next epoch, so the stream never ends and no
rank ever waits for another. With `resample`, each epoch of a stream is instead as many shards as a fair split would
give it (at least one), drawn with replacement by (seed, epoch, stream).

Fewer shards than streams is refused when the loader is built (without `resample`): a stream with no shard
would have nothing to give, and a DataLoader waiting for it would hang.

Resume. A stream's position is (epoch, records taken from its shuffle buffer, crops already used of the last
record, batches made). Batches travel with their stream's position, and the main process keeps the position of
the last batch it handed out, per stream. A resumed stream replays its record stream from the start of its
epoch *without decoding audio* (tar reads and the shuffle only), re-decodes the one record whose crops were split
across batches, and carries on: the sequence of sample keys is exactly that of an uninterrupted run with the same
seed, world size and workers. DataLoader serves its workers round-robin; the loader rotates which worker plays which
stream so that the stream due next comes first.

Elastic resume (another world size or number of workers). The old streams' positions say exactly which records of
their epoch each had taken: replaying each old stream's shuffle on record keys alone (tar headers, no audio) gives
them. What no old stream had reached yet, as *pieces* (a shard, less the records already taken, with the crops
already used of a record that was split across batches), is dealt to the new streams, which read those pieces
through their own shuffle buffers before starting the next epoch in the new layout: every clip of the epoch is used
once, in another order. Streams can be an epoch apart; each epoch that some old stream had begun is continued this
way. With `resample` there is no epoch to complete: the new streams start with the next epoch's draws.

Bad data is skipped and counted by reason (see `SKIP_REASONS`); the counts travel with the batches too.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tar_file_iterator

from data.audio import SAMPLE_RATE, clip_stats, decode_flac
from data.config import AUTO_WORKERS, DataConfig
from data.masking import span_mask
from data.signals import ignore_stop_signals

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "unreadable_shard",  # the shard could not be opened at all (its URL is logged)
    "truncated_tar",  # a shard ended mid-record; the records before the damage are used
    "incomplete_record",  # a record without its .flac member
    "corrupt_audio",  # the FLAC did not decode
    "empty_audio",  # zero samples
    "non_finite",  # NaN or inf samples
    "wrong_sample_rate",  # not 16 kHz
    "too_short",  # shorter than one crop
)


def shard_urls(shards: str) -> list[str]:
    """A manifest.json path, or a brace-expanded URL pattern (local paths, `pipe:` commands, anything wds opens)."""
    if shards.endswith(".json"):
        manifest = Path(shards)
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no such manifest; write one with `music2vec shard`")
        entries = json.loads(manifest.read_text())["shards"]
        urls = [str(manifest.parent / entry["url"]) for entry in entries]
    else:
        urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"data.shards={shards!r} names no shard")
    return urls


def _leave_signals_to_the_trainer(_worker: int) -> None:
    """The training process answers a scheduler's signal by checkpointing and then shuts its workers down; a worker
    that died of the signal first (torch installs a SIGTERM handler that exits) would take the rank down before it
    could checkpoint."""
    ignore_stop_signals()


def check_shard_count(shards: int, cfg: DataConfig, world_size: int) -> None:
    """Without resampling, every (rank, worker) stream reads its own shards, so there must be enough of them."""
    streams = world_size * max(cfg.workers, 1)
    if not cfg.resample and shards < streams:
        raise ValueError(
            f"{shards} shard(s) for {world_size} rank(s) x {max(cfg.workers, 1)} worker(s) ="
            f" {streams} streams: each needs at least one shard. Write smaller shards"
            " (music2vec shard --shard-max-count), lower data.workers, or set data.resample=true"
        )


@dataclass
class Batch:
    audio: torch.Tensor  # (batch, crop_samples) float32, each clip normalised before cropping
    mask: torch.Tensor  # (batch, frames) bool, True where the student sees the mask embedding
    keys: list[str]  # the sample key each crop came from
    epochs: list[int]  # the epoch each crop belongs to

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) for custom batch types
        return Batch(self.audio.pin_memory(), self.mask.pin_memory(), self.keys, self.epochs)


# Counted while reading shards, so counted again when a resumed stream replays its epoch (see StreamPosition.resumed);
# the other reasons are counted when decoding, which the replay skips.
READ_LEVEL_REASONS = ("unreadable_shard", "truncated_tar")


@dataclass
class StreamPosition:
    """Where one stream stands after the last batch it made."""

    epoch: int = 0
    records: int = 0  # records taken from the shuffle buffer in this epoch, the partly used one included
    crops: int = 0  # crops already used of the last record taken
    batches: int = 0  # batches made, all epochs
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_at_epoch_start: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "records": self.records,
            "crops": self.crops,
            "batches": self.batches,
            "skipped": dict(self.skipped),
            "skipped_at_epoch_start": dict(self.skipped_at_epoch_start),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamPosition:
        counts = Counter(state["skipped"]), Counter(state["skipped_at_epoch_start"])
        return cls(state["epoch"], state["records"], state["crops"], state["batches"], *counts)

    @classmethod
    def resumed(cls, state: dict[str, Any]) -> StreamPosition:
        """The state to continue from: read-level counts go back to the epoch start, since the replay recounts them."""
        skipped = Counter(state["skipped"])
        at_start = Counter(state["skipped_at_epoch_start"])
        for reason in READ_LEVEL_REASONS:
            skipped[reason] = at_start[reason]
        return cls(state["epoch"], state["records"], state["crops"], state["batches"], +skipped, at_start)


CROPS_USED = "__crops_used__"  # set on a record whose first crops were used before an elastic resume


@dataclass(frozen=True)
class Piece:
    """What a stream reads of one shard in one epoch: all of it, or, continuing an epoch after an elastic resume,
    what the streams before it had not taken."""

    shard: int  # its index in the shard list (not its URL: the shards may move between a resume and the next)
    taken: frozenset[str] = frozenset()  # keys of records already used in this epoch
    crops_used: dict[str, int] = field(default_factory=dict)  # a record split across batches: crops already used

    def records(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`records` of this piece's shard, less those taken; a split record says which crop to continue from."""
        for record in records:
            key = record["__key__"]
            if key in self.taken:
                continue
            if key in self.crops_used:
                record[CROPS_USED] = self.crops_used[key]
            yield record

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "taken": sorted(self.taken), "crops_used": dict(self.crops_used)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Piece:
        return cls(state["shard"], frozenset(state["taken"]), dict(state["crops_used"]))


Continued = dict[int, list[Piece]]  # epoch -> the pieces a stream reads in it, for epochs continued elastically


class _Clip(NamedTuple):
    audio: np.ndarray  # decoded, 16 kHz
    mean: float  # of the whole clip
    scale: float  # 1 / std of the whole clip


@dataclass
class _Crop:
    key: str
    samples: np.ndarray  # a view into the decoded clip
    mean: float  # of the whole clip: the crop becomes (samples - mean) * scale
    scale: float


@dataclass
class _Tagged:
    """What a DataLoader worker sends: the batch, the stream that made it, and that stream's position after it."""

    batch: Batch
    stream: int
    state: dict[str, Any]

    def pin_memory(self) -> _Tagged:
        return _Tagged(self.batch.pin_memory(), self.stream, self.state)


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([*parts])


class RankStreams(IterableDataset):
    """The streams of one rank; `StreamingLoader` runs each in a DataLoader worker and tracks their positions."""

    def __init__(
        self, cfg: DataConfig, urls: list[str], *, frames: int, rank: int, world_size: int, workers: int
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.frames = cfg, urls, frames
        self.rank, self.world_size = rank, world_size
        self.streams_per_rank = max(workers, 1)  # one per DataLoader worker; one in the main process without workers
        self.crop_samples = round(cfg.crop_seconds * SAMPLE_RATE)
        self.rotation = 0  # the stream DataLoader worker 0 plays; set by the loader
        self.resume: dict[int, dict[str, Any]] = {}  # stream -> StreamPosition dict
        self.continued: dict[int, Continued] = {}  # stream -> the epochs it continues after an elastic resume

    def __iter__(self) -> Iterator[_Tagged]:
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.rotation) % self.streams_per_rank
        state = StreamPosition.resumed(self.resume[stream]) if stream in self.resume else StreamPosition()
        return self.batches(stream, state)

    # One stream, stage by stage: shards -> records -> shuffled records -> crops -> batches.

    def batches(self, stream: int, state: StreamPosition) -> Iterator[_Tagged]:
        """Batches of this rank's `stream`, from position `state` on, forever."""
        audio = np.empty((self.cfg.batch_size, self.crop_samples), dtype=np.float32)
        keys: list[str] = []
        epochs: list[int] = []
        for crop, position in self._crops(stream, state):
            # Normalising while copying into the batch equals normalising the clip, then cropping: it is affine.
            row = audio[len(keys)]
            np.subtract(crop.samples, crop.mean, out=row)
            row *= crop.scale
            keys.append(crop.key)
            epochs.append(position[0])
            if len(keys) < self.cfg.batch_size:
                continue
            state.epoch, state.records, state.crops = position
            mask = span_mask(
                len(keys),
                self.frames,
                mask_prob=self.cfg.mask_prob,
                span=self.cfg.mask_length,
                min_spans=self.cfg.min_spans,
                rng=_seed(self.cfg.seed, self.rank, stream, state.batches),
            )
            state.batches += 1
            batch = Batch(torch.from_numpy(audio), torch.from_numpy(mask), keys, epochs)
            yield _Tagged(batch, stream, state.to_dict())
            audio = np.empty_like(audio)
            keys, epochs = [], []

    def _crops(self, stream: int, state: StreamPosition) -> Iterator[tuple[_Crop, tuple[int, int, int]]]:
        """(crop, position after it) for every crop from `state`'s position on; epochs follow one another."""
        epoch, skip_records, skip_crops = state.epoch, state.records, state.crops
        empty_epochs = 0
        while True:
            progressed = epoch in self.continued.get(stream, {})  # a continued epoch may hold nothing for this stream
            for index, record in enumerate(self._shuffled_records(stream, epoch, state.skipped), start=1):
                if index < skip_records or (index == skip_records and skip_crops >= self.cfg.crops_per_clip):
                    progressed = True  # consumed before the resume point: replayed without decoding
                    continue
                clip = self._decode(record, state.skipped)
                if clip is None:
                    continue
                first = skip_crops if index == skip_records else record.get(CROPS_USED, 0)
                for number, crop in enumerate(self._random_crops(clip, record["__key__"], epoch)):
                    if number >= first:
                        progressed = True
                        yield crop, (epoch, index, number + 1)
            empty_epochs = 0 if progressed else empty_epochs + 1
            if empty_epochs >= self._patience():
                raise RuntimeError(
                    f"rank {self.rank} stream {stream}: no usable audio in its shards for {empty_epochs} epoch(s)"
                    f" (skipped: {dict(state.skipped)}); check data.shards"
                )
            epoch, skip_records, skip_crops = epoch + 1, 0, 0
            state.skipped_at_epoch_start = Counter(state.skipped)

    def _patience(self) -> int:
        """Empty epochs tolerated: none when shards are split (the same shards come back), a few draws' worth else."""
        return 3 * math.ceil(len(self.urls) / self._shards_per_epoch()) if self.cfg.resample else 1

    def _shards_per_epoch(self) -> int:
        return max(1, len(self.urls) // (self.world_size * self.streams_per_rank))

    def _stream_shards(self, stream: int, epoch: int) -> list[int]:
        """The shards (indices into the shard list) `stream` reads in a regular epoch."""
        streams = self.world_size * self.streams_per_rank
        index = self.rank * self.streams_per_rank + stream  # among every rank's streams
        if self.cfg.resample:
            draws = _seed(self.cfg.seed, epoch, index).integers(len(self.urls), size=self._shards_per_epoch())
            return [int(shard) for shard in draws]
        order = _seed(self.cfg.seed, epoch).permutation(len(self.urls))
        return [int(shard) for shard in order[index::streams]]

    def _epoch_pieces(self, stream: int, epoch: int) -> list[Piece]:
        """What `stream` reads in `epoch`: its share of the shards, or its part of an epoch continued elastically."""
        continued = self.continued.get(stream, {})
        if epoch in continued:
            return continued[epoch]
        return [Piece(shard) for shard in self._stream_shards(stream, epoch)]

    def _shuffled_records(self, stream: int, epoch: int, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        pieces = self._epoch_pieces(stream, epoch)
        records = (r for piece in pieces for r in piece.records(_read_shard(self.urls[piece.shard], skipped)))
        return _shuffled(records, self.cfg.shuffle_buffer, self._shuffle_rng(stream, epoch))

    def _shuffle_rng(self, stream: int, epoch: int) -> np.random.Generator:
        return _seed(self.cfg.seed, epoch, self.rank, stream)

    def unread(self, stream: int, position: StreamPosition, *, through: int) -> Continued:
        """What `stream` had not taken, at `position`, of its epochs up to `through`: the pieces left of the epoch
        it was in (from a replay of its shuffle on record keys alone), and all its pieces of the later ones."""
        left = {position.epoch: self._unread_in_epoch(stream, position)}
        return left | {epoch: self._epoch_pieces(stream, epoch) for epoch in range(position.epoch + 1, through + 1)}

    def _unread_in_epoch(self, stream: int, position: StreamPosition) -> list[Piece]:
        pieces = self._epoch_pieces(stream, position.epoch)
        read = [0] * len(pieces)
        finished = [False] * len(pieces)

        def keys_of(index: int, piece: Piece) -> Iterator[tuple[int, str]]:
            for record in piece.records({"__key__": key} for key in shard_keys(self.urls[piece.shard])):
                read[index] += 1
                yield index, record["__key__"]
            finished[index] = True

        records = (record for index, piece in enumerate(pieces) for record in keys_of(index, piece))
        shuffled = _shuffled(records, self.cfg.shuffle_buffer, self._shuffle_rng(stream, position.epoch))
        taken: list[set[str]] = [set() for _ in pieces]
        last = None
        for index, key in itertools.islice(shuffled, position.records):
            taken[index].add(key)
            last = index, key
        split = {}
        if last and position.crops < self.cfg.crops_per_clip:  # the last record taken still has crops to give
            taken[last[0]].discard(last[1])
            split = {last: position.crops}
        left = []
        for index, piece in enumerate(pieces):
            if finished[index] and len(taken[index]) == read[index]:
                continue  # every record of it was used
            all_taken = piece.taken | taken[index]
            crops_used = {key: used for key, used in piece.crops_used.items() if key not in all_taken}
            crops_used |= {key: used for (at, key), used in split.items() if at == index}
            left.append(Piece(piece.shard, frozenset(all_taken), crops_used))
        return left

    def _decode(self, record: dict[str, Any], skipped: Counter[str]) -> _Clip | None:
        """The decoded clip of a usable record; None, counted by reason, for anything else."""
        if "flac" not in record:
            skipped["incomplete_record"] += 1
            return None
        if not record["flac"]:  # what a FLAC encoder leaves for zero samples
            skipped["empty_audio"] += 1
            return None
        try:
            audio, rate = decode_flac(record["flac"])
        except Exception:  # noqa: BLE001 - any undecodable payload is skipped and counted
            skipped["corrupt_audio"] += 1
            return None
        reason, mean, scale = None, 0.0, 1.0
        if audio.size == 0:
            reason = "empty_audio"
        elif rate != SAMPLE_RATE:
            reason = "wrong_sample_rate"
        elif audio.size < self.crop_samples:
            reason = "too_short"
        else:
            mean, scale = clip_stats(audio)
            reason = None if math.isfinite(mean) and math.isfinite(scale) and scale > 0 else "non_finite"
        if reason:
            skipped[reason] += 1
            return None
        return _Clip(audio, mean, scale)

    def _random_crops(self, clip: _Clip, key: str, epoch: int) -> Iterator[_Crop]:
        rng = _seed(self.cfg.seed, epoch, zlib.crc32(key.encode()))
        starts = rng.integers(0, clip.audio.size - self.crop_samples + 1, size=self.cfg.crops_per_clip)
        for start in starts:
            yield _Crop(key, clip.audio[start : start + self.crop_samples], clip.mean, clip.scale)


def _shuffled(records: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """`records` through a shuffle buffer of `size`: each is drawn at random from the last `size` read."""
    buffer: list[Any] = []
    for record in records:
        buffer.append(record)
        if len(buffer) >= size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[Any], rng: np.random.Generator) -> Any:
    index = rng.integers(len(buffer))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def _read_shard(url: str, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """Records ({"__key__", "flac", "json"}) of one shard; an unreadable or damaged shard is counted, not raised."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 - a shard that cannot be opened is reported and skipped
        log.warning("cannot open shard %s: %s", url, error)
        skipped["unreadable_shard"] += 1
        return
    record: dict[str, Any] = {}
    try:
        with stream:
            for member in tar_file_iterator(stream):
                key, _, extension = member["fname"].partition(".")
                if record and key != record["__key__"]:
                    yield record
                    record = {}
                record["__key__"] = key
                record[extension] = member["data"]
    except Exception as error:  # noqa: BLE001 - tarfile raises several types for damaged archives
        log.warning("damaged shard %s: %s", url, error)
        skipped["truncated_tar"] += 1
    if record:
        yield record  # holds only members read in full; the member being read when the damage came is lost


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar iterator skips as metadata


def shard_keys(url: str) -> list[str]:
    """The record keys of one shard, in the order `_read_shard` gives its records. An intact, uncompressed local tar
    is read header by header, seeking past the audio; anything else is read whole."""
    if "://" not in url and not url.startswith("pipe:"):
        keys = _keys_from_headers(Path(url))
        if keys is not None:
            return keys
    return [record["__key__"] for record in _read_shard(url, Counter())]


def _keys_from_headers(path: Path) -> list[str] | None:
    """None when `path` is not an intact uncompressed tar: the full read then decides what a damaged one holds."""
    try:
        size = path.stat().st_size
        keys: list[str] = []
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg() or _META_MEMBER.match(member.name):
                    continue
                if member.offset_data + member.size > size:
                    return None  # cut short inside this member
                key = member.name.partition(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except (OSError, tarfile.TarError):
        return None
    return keys


class StreamingLoader:
    """Batches for one rank, from DataLoader workers, with `state_dict`/`load_state_dict` for exact resume and
    `continue_elastically` for a resume in another layout (world size, workers).

    Iterating again after a break (or after loading a state) continues where the last handed-out batch left off.
    """

    def __init__(self, cfg: DataConfig, *, frames: int, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.urls = shard_urls(cfg.shards)
        if cfg.workers == AUTO_WORKERS:
            raise ValueError("data.workers=-1 must be resolved first: DataConfig.sized_for(cpus_per_rank)")
        check_shard_count(len(self.urls), cfg, world_size)
        self.streams = RankStreams(
            cfg, self.urls, frames=frames, rank=rank, world_size=world_size, workers=cfg.workers
        )
        self._positions: dict[int, dict[str, Any]] = {}  # stream -> its position after the last batch handed out
        self._next_stream = 0
        self._identity = {
            "seed": cfg.seed,
            "shards": len(self.urls),  # the epochs' shard orders depend on it: a grown manifest is another stream
            "rank": rank,
            "world_size": world_size,
            "workers": cfg.workers,
        }

    def __iter__(self) -> Iterator[Batch]:
        self.streams.rotation = self._next_stream
        self.streams.resume = dict(self._positions)
        loader = DataLoader(
            self.streams,
            batch_size=None,  # workers make whole batches
            num_workers=self.cfg.workers,
            pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
            # Workers seed themselves from the config; a private generator keeps DataLoader from drawing its worker
            # seeds from torch's global RNG, whose stream dropout and LayerDrop must see unchanged across a resume.
            generator=torch.Generator().manual_seed(self.cfg.seed),
            worker_init_fn=_leave_signals_to_the_trainer,
        )
        for tagged in loader:
            self._positions[tagged.stream] = tagged.state
            self._next_stream = (tagged.stream + 1) % max(self.cfg.workers, 1)
            yield tagged.batch

    def skipped(self) -> dict[str, int]:
        """Samples and shards skipped so far, by reason, summed over this rank's streams (for logging)."""
        total: Counter[str] = Counter()
        for state in self._positions.values():
            total.update(state["skipped"])
        return {reason: total[reason] for reason in SKIP_REASONS}

    def state_dict(self) -> dict[str, Any]:
        continued = {}  # the continued epochs a stream has not finished; the finished ones are needed no more
        for stream, epochs in self.streams.continued.items():
            now = self._positions.get(stream, {}).get("epoch", 0)
            left = {epoch: [piece.to_dict() for piece in pieces] for epoch, pieces in epochs.items() if epoch >= now}
            if left:
                continued[stream] = left
        state = {
            "identity": self._identity,
            "streams": self._positions,
            "next_stream": self._next_stream,
            "continued": continued,
        }
        return copy.deepcopy(state)  # a snapshot: iteration goes on replacing the live entries

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "streams" not in state:
            raise ValueError(
                "data-loader state written by an earlier music2vec (it names streams 'workers'): resume that"
                " checkpoint with the version that wrote it"
            )
        if state["identity"] != self._identity:
            raise ValueError(
                f"data-loader state was saved with {state['identity']} and cannot continue exactly with"
                f" {self._identity}: the same seed, shards, world size and data.workers continue exactly;"
                " continue_elastically() takes every rank's state for another world size or data.workers"
            )
        self._positions = {int(stream): position for stream, position in state["streams"].items()}
        self._next_stream = state["next_stream"]
        self.streams.continued = _continued_from(state.get("continued", {}))

    def continue_elastically(self, states: list[dict[str, Any]]) -> str:
        """Continue from the states of every rank of a run in another layout (world size or workers), using each
        clip of the epoch in progress exactly once (see the module's docstring); what was done, in words."""
        old = _check_elastic_states(states, seed=self.cfg.seed, shards=len(self.urls))
        positions = {}
        for state in old:
            saved = {int(stream): position for stream, position in state["streams"].items()}
            for stream in range(max(state["identity"]["workers"], 1)):
                position = StreamPosition.from_dict(saved[stream]) if stream in saved else StreamPosition()
                positions[state["identity"]["rank"], stream] = position
        batches = max(position.batches for position in positions.values())
        skipped = sum((position.skipped for (rank, _), position in positions.items() if rank == 0), Counter())
        first, last = min(p.epoch for p in positions.values()), max(p.epoch for p in positions.values())
        if self.cfg.resample:  # no epoch to complete: the next draws, in the new layout
            first = last + 1
            continued: dict[int, Continued] = {}
            said = f"data.resample: the new streams draw from epoch {first}"
        else:
            unread = self._unread_pieces(old, positions, through=last)
            continued = self._deal(unread, first, last)
            said = _what_was_left(sum(len(pieces) for epochs in unread for pieces in epochs.values()), first, last)
        self._positions = {stream: StreamPosition(first, batches=batches).to_dict() for stream in self._stream_ids()}
        if self._identity["rank"] == 0:  # rank 0's counts go on from the old rank 0's: they are the ones logged
            self._positions[0] |= {"skipped": dict(skipped), "skipped_at_epoch_start": dict(skipped)}
        self._next_stream = 0
        self.streams.continued = continued
        return said

    def _stream_ids(self) -> range:
        return range(max(self.cfg.workers, 1))

    def _unread_pieces(
        self, old: list[dict[str, Any]], positions: dict[tuple[int, int], StreamPosition], *, through: int
    ) -> list[Continued]:
        """Every old stream's unread pieces, in the order of the old streams (rank, then worker)."""
        unread = []
        for state in old:
            identity = state["identity"]
            streams = RankStreams(
                self.cfg,
                self.urls,
                frames=self.streams.frames,
                rank=identity["rank"],
                world_size=identity["world_size"],
                workers=identity["workers"],
            )
            streams.continued = _continued_from(state.get("continued", {}))
            rank = identity["rank"]
            unread += [streams.unread(s, positions[rank, s], through=through) for s in range(streams.streams_per_rank)]
        return unread

    def _deal(self, unread: list[Continued], first: int, last: int) -> dict[int, Continued]:
        """This rank's streams' share of every continued epoch: the pieces in turn, one to each new stream."""
        streams_per_rank = max(self.cfg.workers, 1)
        everyone = self._identity["world_size"] * streams_per_rank
        mine = self._identity["rank"] * streams_per_rank
        continued: dict[int, Continued] = {stream: {} for stream in self._stream_ids()}
        for epoch in range(first, last + 1):
            pieces = [piece for epochs in unread for piece in epochs.get(epoch, [])]
            for stream in self._stream_ids():
                continued[stream][epoch] = pieces[mine + stream :: everyone]
        return continued


def _what_was_left(pieces: int, first: int, last: int) -> str:
    epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    then = f"epoch {last + 1} starts in the new layout"
    if not pieces:
        return f"the old loader streams had read {epochs} whole; {then}"
    return f"the {pieces} shard piece(s) the old loader streams left of {epochs} are dealt to the new ones; {then}"


def _continued_from(state: dict[Any, Any]) -> dict[int, Continued]:
    """A saved `continued` (JSON turns its integer keys into strings) back into pieces."""
    return {
        int(stream): {int(epoch): [Piece.from_dict(piece) for piece in pieces] for epoch, pieces in epochs.items()}
        for stream, epochs in state.items()
    }


def _check_elastic_states(states: list[dict[str, Any]], *, seed: int, shards: int) -> list[dict[str, Any]]:
    """The states of one run's ranks, 0 to N-1, by rank; a ValueError naming what does not fit."""
    if not states or any("streams" not in state for state in states):
        raise ValueError("data-loader states for an elastic resume must come from every rank of one checkpoint")
    identities = [state["identity"] for state in states]
    world = identities[0]["world_size"]
    ranks = sorted(identity["rank"] for identity in identities)
    if ranks != list(range(world)) or any(identity["world_size"] != world for identity in identities):
        raise ValueError(f"data-loader states of ranks {ranks} do not make up a run of {world} ranks")
    if any(identity["seed"] != seed for identity in identities):
        raise ValueError(f"data-loader state was saved with data.seed={identities[0]['seed']}, this run has {seed}")
    if any(identity["shards"] != shards for identity in identities):
        raise ValueError(
            f"data-loader state was saved reading {identities[0]['shards']} shards, data.shards names {shards}:"
            " the epoch in progress cannot be continued on another shard set"
        )
    return sorted(states, key=lambda state: state["identity"]["rank"])
