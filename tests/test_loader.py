"""The streaming loader on real shards written by the writer: shapes, masks, resume, splits, bad data."""

import contextlib
import io
import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from conftest import tone

from data import SKIP_REASONS, DataConfig, StreamingLoader
from data.audio import encode_flac

FRAMES_5S = 249


def loader(shards, *, rank=0, world_size=1, **overrides) -> StreamingLoader:
    fields = {"shards": str(shards / "manifest.json"), "batch_size": 4, "crops_per_clip": 2, "workers": 2}
    fields |= {"shuffle_buffer": 5, "seed": 3}
    return StreamingLoader(DataConfig(**(fields | overrides)), frames=FRAMES_5S, rank=rank, world_size=world_size)


def take(source, count):
    return list(itertools.islice(iter(source), count))


def test_batches_have_a_fixed_shape_normalised_clips_and_equal_mask_counts(shards):
    batches = take(loader(shards), 20)
    for batch in batches:
        assert batch.audio.shape == (4, 80_000)
        assert batch.mask.shape == (4, FRAMES_5S)
        assert len(batch.keys) == 4
        counts = batch.mask.sum(dim=1)
        assert (counts == counts[0]).all()
    fraction = np.mean([batch.mask.float().mean().item() for batch in batches])
    assert 0.40 <= fraction <= 0.50
    # Crops come from clips normalised as a whole, so over many crops the mean is near 0 and the variance near 1.
    audio = np.concatenate([batch.audio.numpy().ravel() for batch in batches])
    assert abs(audio.mean()) < 0.05
    assert audio.var() == pytest.approx(1.0, abs=0.1)


def test_resumed_loader_continues_with_exactly_the_same_samples(shards):
    uninterrupted = take(loader(shards), 30)
    first = loader(shards)
    head = take(first, 13)  # mid-epoch: 32 clips x 2 crops / 4 = 16 batches per epoch
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    resumed = loader(shards)
    resumed.load_state_dict(state)
    tail = take(resumed, 17)
    for expected, got in zip(uninterrupted, head + tail, strict=True):
        assert got.keys == expected.keys
        assert np.array_equal(got.audio.numpy(), expected.audio.numpy())
        assert np.array_equal(got.mask.numpy(), expected.mask.numpy())


def test_exact_resume_refuses_another_layout(shards):
    state = loader(shards).state_dict()
    other = loader(shards, rank=0, world_size=2, workers=1)
    with pytest.raises(ValueError, match=r"same seed, shards, world size and data\.workers continue exactly"):
        other.load_state_dict(state)


def test_ranks_and_workers_split_one_epoch_exactly(shards):
    """Without resampling, every clip is read once per epoch, by exactly one stream (rank, worker)."""
    keys_by_stream = {}
    for rank in range(2):
        source = loader(shards, rank=rank, world_size=2, batch_size=1, crops_per_clip=1)
        with contextlib.closing(iter(source)) as iterator:
            seen = {0: [], 1: []}
            while True:
                batch = next(iterator)
                state = source.state_dict()
                stream = (state["next_stream"] - 1) % 2
                if state["streams"][stream]["epoch"] == 0:
                    seen[stream].extend(batch.keys)
                if len(state["streams"]) == 2 and all(s["epoch"] >= 1 for s in state["streams"].values()):
                    break
        for stream, keys in seen.items():
            keys_by_stream[rank, stream] = keys
    everything = [key for keys in keys_by_stream.values() for key in keys]
    assert len(everything) == len(set(everything)) == 32
    assert all(keys for keys in keys_by_stream.values())


def test_fewer_shards_than_streams_fails_at_once_unless_resampling(shards):
    with pytest.raises(ValueError, match=r"8 shard\(s\) for 5 rank\(s\) x 2 worker\(s\)"):
        loader(shards, world_size=5)
    batches = take(loader(shards, rank=4, world_size=5, resample=True), 8)  # never hangs
    assert len(batches) == 8


def write_tar(path, records):
    with wds.TarWriter(str(path)) as sink:
        for record in records:
            sink.write(record)


def flac_record(key, seconds=6.0, rate=16_000, seed=0):
    audio = tone(seconds, rate, seed)[:, 0]
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="FLAC", subtype="PCM_16")
    return {"__key__": key, "flac": buffer.getvalue(), "json": b"{}"}


def truncate_inside(path, member):
    """Cut a tar file in the middle of `member`'s data, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def test_bad_data_is_skipped_and_counted_by_reason(tmp_path):
    nan = tone(6.0, 16_000, seed=1)[:, 0]
    nan[100] = np.nan
    nan_wav = io.BytesIO()
    sf.write(nan_wav, nan, 16_000, format="WAV", subtype="FLOAT")
    write_tar(
        tmp_path / "bad-0.tar",
        [
            flac_record("good0"),
            {"__key__": "corrupt", "flac": b"fLaC but not really", "json": b"{}"},
            {"__key__": "empty", "flac": encode_flac(np.zeros(0, dtype=np.float32)), "json": b"{}"},
            {"__key__": "nonfinite", "flac": nan_wav.getvalue(), "json": b"{}"},
            flac_record("wrongrate", rate=22_050),
            flac_record("short", seconds=2.0),
            {"__key__": "noaudio", "json": b"{}"},
            flac_record("good1", seed=2),
        ],
    )
    write_tar(tmp_path / "bad-1.tar", [flac_record("fine0", seed=10), flac_record("fine1", seed=11)])
    truncate_inside(tmp_path / "bad-1.tar", "fine1.flac")
    pattern = str(tmp_path / "bad-{0..2}.tar")  # bad-2.tar does not exist
    source = StreamingLoader(
        DataConfig(shards=pattern, batch_size=1, crops_per_clip=1, workers=0, shuffle_buffer=1),
        frames=FRAMES_5S,
    )
    keys, iterator = [], iter(source)
    while source.state_dict()["streams"].get(0, {"epoch": 0})["epoch"] == 0:
        keys.extend(next(iterator).keys)
    assert sorted(keys[:-1]) == ["fine0", "good0", "good1"]  # the last batch is epoch 1's first
    epoch_0 = source.state_dict()["streams"][0]["skipped_at_epoch_start"]
    assert epoch_0 == {
        "unreadable_shard": 1,
        "truncated_tar": 1,
        "incomplete_record": 1,
        "corrupt_audio": 1,
        "empty_audio": 1,
        "non_finite": 1,
        "wrong_sample_rate": 1,
        "too_short": 1,
    }
    assert set(epoch_0) == set(SKIP_REASONS)
    assert all(source.skipped()[reason] >= count for reason, count in epoch_0.items())


def test_nothing_readable_is_a_clear_error(tmp_path):
    source = StreamingLoader(
        DataConfig(shards=str(tmp_path / "missing-{0..1}.tar"), batch_size=2, workers=0), frames=FRAMES_5S
    )
    with pytest.raises(RuntimeError, match="no usable audio"):
        take(source, 1)


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        StreamingLoader(DataConfig(shards=str(tmp_path / "manifest.json")), frames=FRAMES_5S)


def test_skip_counts_survive_a_resume_without_double_counting(tmp_path):
    write_tar(
        tmp_path / "mixed-0.tar",
        [flac_record("a"), {"__key__": "corrupt", "flac": b"junk", "json": b"{}"}, flac_record("b", seed=3)],
    )
    write_tar(tmp_path / "mixed-1.tar", [flac_record("c", seed=4), {"__key__": "noaudio", "json": b"{}"}])
    write_tar(tmp_path / "mixed-2.tar", [flac_record("d", seed=5), flac_record("e", seed=6)])
    truncate_inside(tmp_path / "mixed-2.tar", "e.flac")
    cfg = DataConfig(shards=str(tmp_path / "mixed-{0..3}.tar"), batch_size=1, crops_per_clip=2, workers=0)
    uninterrupted = StreamingLoader(cfg, frames=FRAMES_5S)
    take(uninterrupted, 17)  # into the third epoch: 4 good clips x 2 crops per epoch
    for stop in range(1, 17):  # every resume point of two epochs
        interrupted = StreamingLoader(cfg, frames=FRAMES_5S)
        take(interrupted, stop)
        resumed = StreamingLoader(cfg, frames=FRAMES_5S)
        resumed.load_state_dict(interrupted.state_dict())
        take(resumed, 17 - stop)
        assert resumed.skipped() == uninterrupted.skipped(), f"resumed after {stop} batches"
    assert uninterrupted.skipped()["corrupt_audio"] >= 2  # once in each epoch read so far


def test_pipe_urls_stream_through_a_command(shards):
    pattern = f"pipe:cat {shards}/shard-{{000000..000007}}.tar"
    batches = take(StreamingLoader(DataConfig(shards=pattern, batch_size=4, workers=2), frames=FRAMES_5S), 3)
    assert all(batch.audio.shape == (4, 80_000) for batch in batches)


def test_unthinned_masks_are_whole_spans_of_ten(shards):
    """With one crop per batch nothing is thinned, so every masked run is one or more merged 10-frame spans."""
    for batch in take(loader(shards, batch_size=1), 20):
        row = batch.mask[0].numpy().astype(int)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
        assert ((edges[1::2] - edges[::2]) >= 10).all()


def crops_of_epoch(batches, epoch):
    """(key, digest of the crop's samples) of every crop of `epoch` in `batches`: what identifies a sample."""
    return Counter(
        (key, hash(row.tobytes()))
        for batch in batches
        for key, at, row in zip(batch.keys, batch.epochs, batch.audio.numpy(), strict=True)
        if at == epoch
    )


def run_until_epoch(loaders, epoch, *, limit=200):
    """Batches of every loader until each of its streams has moved on to `epoch` (one rank after another)."""
    batches = []
    for source in loaders:
        with contextlib.closing(iter(source)) as iterator:
            for _ in range(limit):
                state = source.state_dict()["streams"]
                if len(state) == max(source.cfg.workers, 1) and all(s["epoch"] >= epoch for s in state.values()):
                    break
                batches.append(next(iterator))
            else:
                pytest.fail(f"a stream never reached epoch {epoch}")
    return batches


def layout(shards, world_size, workers, **overrides):
    return [
        loader(shards, rank=rank, world_size=world_size, workers=workers, **overrides) for rank in range(world_size)
    ]


def interrupted(shards, world_size, workers, steps, **overrides):
    """The loaders of a run of `world_size` ranks after `steps` batches each, and the batches they gave."""
    loaders = layout(shards, world_size, workers, **overrides)
    batches = [batch for source in loaders for batch in take(source, steps)]
    states = [json.loads(json.dumps(source.state_dict())) for source in loaders]  # what checkpoints would store
    return states, batches


@pytest.mark.parametrize(
    ("before", "after", "steps", "batch_size"),
    [((2, 2), (1, 3), 3, 4), ((1, 1), (2, 2), 7, 4), ((2, 1), (3, 2), 6, 4), ((1, 2), (2, 1), 21, 3)],
    ids=["2x2-to-1x3", "1x1-to-2x2", "2x1-to-3x2", "1x2-to-2x1-across-epochs"],
)
def test_an_elastic_resume_uses_every_clip_of_the_epoch_exactly_once(shards, before, after, steps, batch_size):
    """Another world size and workers: the crops of the epoch in progress, old and resumed together, are those of an
    uninterrupted run (keys and samples), in another order."""
    uninterrupted = crops_of_epoch(run_until_epoch(layout(shards, *before, batch_size=batch_size), 1), 0)
    assert sum(uninterrupted.values()) == 32 * 2  # 32 clips, 2 crops each
    states, head = interrupted(shards, *before, steps, batch_size=batch_size)
    epochs = {position["epoch"] for state in states for position in state["streams"].values()}
    assert epochs == ({0, 1} if batch_size == 3 else {0})  # 10 2/3 batches per stream: one is in the next epoch
    resumed = layout(shards, *after, batch_size=batch_size)
    for source in resumed:
        source.continue_elastically(states)
    tail = run_until_epoch(resumed, 2 if batch_size == 3 else 1)
    assert crops_of_epoch(head + tail, 0) == uninterrupted
    assert crops_of_epoch(tail, 0), "the resume had something left of the epoch to read"
    if batch_size == 3:  # epoch 1, begun by one old stream, is completed by the new ones too
        assert crops_of_epoch(head + tail, 1) == crops_of_epoch(
            run_until_epoch(layout(shards, *before, batch_size=3), 2), 1
        )


def test_an_elastic_resume_during_a_continued_epoch_and_an_exact_one_after_it(shards):
    """2x2 -> 1x3 -> 2x1, each before the epoch is done, then an exact resume of the last layout: still every
    clip once; the third layout's states carry the continued pieces."""
    expected = crops_of_epoch(run_until_epoch(layout(shards, 2, 2), 1), 0)
    states, head = interrupted(shards, 2, 2, 2)
    second = layout(shards, 1, 3)
    second[0].continue_elastically(states)
    middle = take(second[0], 4)
    third = layout(shards, 2, 1)
    for source in third:
        source.continue_elastically([json.loads(json.dumps(second[0].state_dict()))])
    after_third = [batch for source in third for batch in take(source, 1)]
    saved = [json.loads(json.dumps(source.state_dict())) for source in third]
    assert any(state["continued"] for state in saved)
    exact = layout(shards, 2, 1)
    for source, state in zip(exact, saved, strict=True):
        source.load_state_dict(state)
    tail = run_until_epoch(exact, 1)
    assert crops_of_epoch(head + middle + after_third + tail, 0) == expected


def test_with_resampling_an_elastic_resume_starts_the_next_draws(shards):
    states, _ = interrupted(shards, 2, 1, 5, resample=True)
    resumed = loader(shards, world_size=1, workers=2, resample=True)
    said = resumed.continue_elastically(states)
    last_epoch = max(position["epoch"] for state in states for position in state["streams"].values())
    assert f"epoch {last_epoch + 1}" in said
    assert all(at == last_epoch + 1 for batch in take(resumed, 3) for at in batch.epochs)


def test_an_elastic_resume_refuses_states_that_are_not_one_whole_run(shards):
    states, _ = interrupted(shards, 2, 1, 1)
    with pytest.raises(ValueError, match=r"ranks \[1\] do not make up a run of 2"):
        loader(shards).continue_elastically(states[1:])
    with pytest.raises(ValueError, match=r"data\.seed=3, this run has 4"):
        loader(shards, seed=4).continue_elastically(states)
    fewer = StreamingLoader(
        DataConfig(shards=str(shards / "shard-{000000..000005}.tar"), workers=1, seed=3), frames=FRAMES_5S
    )
    with pytest.raises(ValueError, match=r"saved reading 8 shards, data\.shards names 6"):
        fewer.continue_elastically(states)


def test_shard_keys_from_tar_headers_equal_a_full_read(shards, tmp_path):
    from data.loader import _keys_from_headers, _read_shard, shard_keys

    for tar in sorted(shards.glob("*.tar")):
        assert _keys_from_headers(tar) == [record["__key__"] for record in _read_shard(str(tar), Counter())]
    write_tar(tmp_path / "cut.tar", [flac_record("a"), flac_record("b", seed=1), flac_record("c", seed=2)])
    truncate_inside(tmp_path / "cut.tar", "b.flac")
    assert _keys_from_headers(tmp_path / "cut.tar") is None  # damaged: the full read decides
    assert shard_keys(str(tmp_path / "cut.tar")) == ["a"]
