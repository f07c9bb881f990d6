"""Procedural demo music: deterministic, labelled, and in the key its label says."""

import json
import tarfile

import numpy as np

from data import ShardParams, write_shards
from data.demo import INSTRUMENTS, KEYS, PITCHED, generate, write_demo_corpus

# Krumhansl-Kessler key profiles, C major and C minor.
MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def chroma(audio: np.ndarray, rate: int = 16_000) -> np.ndarray:
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / rate)
    audible = (freqs > 60) & (freqs < 2000)
    pitch_class = np.round(12 * np.log2(freqs[audible] / 440.0) + 69).astype(int) % 12
    return np.bincount(pitch_class, weights=power[audible], minlength=12)


def estimate_key(audio: np.ndarray) -> str:
    """Krumhansl-Schmuckler: the key whose rotated profile correlates best with the clip's chroma."""
    profile = chroma(audio)
    scores = [np.corrcoef(np.roll(p, tonic), profile)[0, 1] for p in (MAJOR, MINOR) for tonic in range(12)]
    return KEYS[int(np.argmax(scores))]  # KEYS lists the 12 major keys from C, then the 12 minor ones


def test_same_seed_same_clip_and_labels():
    audio, labels = generate(5, seconds=4.0)
    again, labels_again = generate(5, seconds=4.0)
    assert np.array_equal(audio, again)
    assert labels == labels_again
    assert not np.array_equal(audio, generate(6, seconds=4.0)[0])


def test_labels_are_well_formed_and_cover_the_label_space():
    seen_keys, seen_instruments = set(), set()
    for seed in range(60):
        audio, labels = generate(seed, seconds=2.0)
        assert audio.dtype == np.float32
        assert audio.shape == (32_000,)
        assert 0.1 < np.abs(audio).max() <= 0.5
        assert labels["key"] in KEYS
        assert 70 <= labels["tempo"] <= 160
        assert 1 <= len(labels["instruments"]) <= 4
        assert set(labels["instruments"]) <= set(INSTRUMENTS)
        assert set(labels["instruments"]) & set(PITCHED)  # someone always plays the harmony
        seen_keys.add(labels["key"])
        seen_instruments.update(labels["instruments"])
    assert len(seen_keys) >= 18
    assert seen_instruments == set(INSTRUMENTS)


def test_a_standard_key_finder_hears_the_labelled_key():
    seeds = range(40)
    hits = sum(estimate_key(audio) == labels["key"] for audio, labels in (generate(seed, 10.0) for seed in seeds))
    assert hits / len(seeds) >= 0.6  # chance is 1/24; relative major/minor confusions make up most misses


def test_labels_travel_into_the_shard_records(tmp_path):
    paths = write_demo_corpus(tmp_path / "demo", clips=2, seed=1, seconds=6.0)
    expected = {str(p.resolve()): json.loads(p.with_suffix(".json").read_text()) for p in paths}
    write_shards(
        [str(tmp_path / "demo")], tmp_path / "shards", ShardParams(clip_seconds=6, min_seconds=5), progress=False
    )
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {r["source"]: r["labels"] for r in records} == expected
