"""The shard writer, on real audio files: formats, clips, records, rejections, determinism, resume after kill -9."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import TEST_PARAMS, tone, write_corpus

from data import ShardParams, write_shards
from data.audio import decode_blocks, decode_file, decode_flac

MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_records(out: Path) -> dict[str, tuple[dict, np.ndarray, int]]:
    records = {}
    for shard in sorted(out.glob("shard-*.tar")):
        files = members(shard)
        for name in files:
            key, extension = name.split(".", 1)
            if extension == "json":
                audio, rate = decode_flac(files[f"{key}.flac"])
                records[key] = (json.loads(files[name]), audio, rate)
    return records


def test_manifest_and_records_describe_every_clip(shards, corpus):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["total_samples"] == 32
    assert manifest["total_seconds"] == pytest.approx(32 * 6.0)
    assert [s["samples"] for s in manifest["shards"]] == [4] * 8
    assert all((shards / s["url"]).is_file() for s in manifest["shards"])
    assert manifest["params"]["clip_seconds"] == 6.0
    assert manifest["rejected"] == 0
    records = all_records(shards)
    assert len(records) == 32
    for record, audio, rate in records.values():
        assert rate == 16_000
        assert audio.size == 6 * 16_000
        assert record["offset"] in (0.0, 6.0)
        source = Path(record["source"])
        assert source.parent == corpus.resolve()
        original = sf.info(source)
        assert record["original_sample_rate"] == original.samplerate
        assert record["original_channels"] == original.channels


def test_inputs_of_every_kind_and_labels_from_sidecars(tmp_path):
    folder = tmp_path / "in"
    paths = write_corpus(folder / "nested", files=2, seconds=7.0)
    (folder / "nested" / "track000.json").write_text(json.dumps({"genre": "test", "tempo": 120}))
    loose = tmp_path / "loose.flac"
    sf.write(loose, tone(7.0, 32_000, seed=9)[:, 0], 32_000)
    listed = tmp_path / "listed.mp3"
    sf.write(listed, tone(7.0, 44_100, seed=10), 44_100)
    opus = tmp_path / "listed.opus"
    sf.write(opus, tone(7.0, 48_000, seed=11, channels=2), 48_000, format="OGG", subtype="OPUS")
    listing = tmp_path / "paths.txt"
    listing.write_text(f"# a comment\n{listed}\n{opus}\n{tmp_path / 'gone.wav'}\n")
    pattern = str(tmp_path / "lo*.flac")
    manifest = write_shards([str(folder), pattern, str(listing)], tmp_path / "out", TEST_PARAMS, progress=False)
    assert manifest["total_samples"] == 5  # two nested files, the globbed one, the listed mp3 and opus
    sources = {Path(r["source"]).name: r for r, _, _ in all_records(tmp_path / "out").values()}
    assert set(sources) == {paths[0].name, paths[1].name, "loose.flac", "listed.mp3", "listed.opus"}
    assert (sources["listed.opus"]["original_sample_rate"], sources["listed.opus"]["original_channels"]) == (48_000, 2)
    assert sources[paths[0].name]["labels"] == {"genre": "test", "tempo": 120}
    assert sources["loose.flac"]["labels"] == {}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["reason"]) for r in rejected] == [("gone.wav", "unreadable")]


def test_bad_inputs_are_rejected_with_reasons_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "in"
    write_corpus(folder, files=1, seconds=7.0)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00not audio")
    sf.write(folder / "short.wav", tone(2.0, 16_000, seed=1), 16_000)
    sf.write(folder / "silent.wav", np.zeros(16_000 * 7, dtype=np.float32), 16_000)
    nan = tone(7.0, 16_000, seed=2)
    nan[1000] = np.nan
    sf.write(folder / "nan.wav", nan, 16_000, subtype="FLOAT")
    sf.write(folder / "mislabelled.wav", tone(7.0, 16_000, seed=3), 16_000)
    (folder / "mislabelled.json").write_text("{genre: rock")
    manifest = write_shards([str(folder)], tmp_path / "out", TEST_PARAMS, progress=False)
    assert manifest["total_samples"] == 1
    assert manifest["rejected"] == 5
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected}
    assert "mislabelled.json are not valid JSON" in next(r["detail"] for r in rejected if "mislabelled" in r["path"])
    assert reasons == {
        "mislabelled.wav": "invalid labels",
        "broken.wav": "unreadable",
        "short.wav": "too short",
        "silent.wav": "silent",
        "nan.wav": "non-finite samples",
    }


def test_same_inputs_give_identical_shards(corpus, shards, tmp_path):
    write_shards([str(corpus)], tmp_path, TEST_PARAMS, progress=False)
    for shard in sorted(shards.glob("shard-*.tar")):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (tmp_path / "manifest.json").read_text() == (shards / "manifest.json").read_text()


def test_a_copied_corpus_gives_the_same_keys_and_clips(corpus, shards, tmp_path):
    """Keys name inputs below their shared folder, so the loader's crops (seeded by key) do not depend on where the
    corpus is mounted; only the `source` field of each record says where it was read."""
    copy = Path(shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus"))
    write_shards([str(copy)], tmp_path / "shards", TEST_PARAMS, progress=False)
    for shard in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(shard) as ours, tarfile.open(tmp_path / "shards" / shard.name) as theirs:
            assert ours.getnames() == theirs.getnames()
            flacs = [name for name in ours.getnames() if name.endswith(".flac")]
            assert [ours.extractfile(n).read() for n in flacs] == [theirs.extractfile(n).read() for n in flacs]


def test_a_finished_folder_and_a_different_interrupted_run_are_refused(shards, corpus, tmp_path):
    with pytest.raises(FileExistsError, match=r"manifest\.json"):
        write_shards([str(corpus)], shards, TEST_PARAMS, progress=False)
    (tmp_path / "progress.jsonl").write_text(json.dumps({"shard": "shard-000000.tar", "next": [1, 0], "params": {}}))
    with pytest.raises(ValueError, match="other inputs or parameters"):
        write_shards([str(corpus)], tmp_path, TEST_PARAMS, progress=False)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="--min-seconds"):
        ShardParams(clip_seconds=5.0, min_seconds=6.0)


def blocked_run(corpus: Path, tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    """The corpus with one more input, sharded as a reference; then that input replaced by a FIFO, on which the
    decoding process that opens it waits: a run stops mid-way, deterministically. (input, reference, output folder,
    the command that shards into it)."""
    folder = tmp_path / "in"
    shutil.copytree(corpus, folder)
    blocker = folder / "track008b.wav"  # sorts between track008 and track009
    sf.write(blocker, tone(13.0, 16_000, seed=99), 16_000)
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{path}\n" for path in sorted(folder.iterdir())))
    reference = tmp_path / "reference"
    write_shards([str(listing)], reference, TEST_PARAMS, progress=False)
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "out"
    command = [MUSIC2VEC, "shard", str(listing), "--out", str(out), "--clip-seconds", "6", "--min-seconds", "5.5"]
    return blocker, reference, out, [*command, "--shard-max-count", "4", "--jobs", "2"]


def resumes_to_the_reference(blocker: Path, reference: Path, out: Path, command: list[str]) -> None:
    """The blocking input made real again, the same command resumes to exactly the reference's shards."""
    blocker.unlink()
    sf.write(blocker, tone(13.0, 16_000, seed=99), 16_000)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for shard in sorted(reference.glob("shard-*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (out / "manifest.json").read_text() == (reference / "manifest.json").read_text()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_shards(corpus, tmp_path):
    """kill -9 while the writer waits on a FIFO among its inputs, then run the same command again."""
    blocker, reference, out, command = blocked_run(corpus, tmp_path)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        journal = out / "progress.jsonl"
        deadline = time.monotonic() + 120
        while not journal.is_file() or len(journal.read_text().splitlines()) < 4:  # the shards before the FIFO
            assert process.poll() is None, "the writer ended before reaching the blocking input"
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the writer and its decoding processes, as a scheduler would
        process.wait()
    assert not (out / "manifest.json").exists()
    assert list(out.glob("*.partial")), "the kill should leave the open shard unfinished"
    resumes_to_the_reference(blocker, reference, out, command)


@pytest.mark.slow
def test_a_decoding_process_killed_for_memory_stops_the_run_which_resumes(corpus, tmp_path):
    """SIGKILL (what the out-of-memory killer sends) to the decoding process stuck on an input: the writer stops
    with a message naming that input instead of waiting forever for its result, and the same command resumes."""
    blocker, reference, out, command = blocked_run(corpus, tmp_path)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (stuck := _process_opening_a_fifo(under=process.pid)) is None:
            assert process.poll() is None, "the writer ended before reaching the blocking input"
            assert time.monotonic() < deadline, "no decoding process reached the blocking input"
            time.sleep(0.1)
        os.kill(stuck, signal.SIGKILL)
        _, errors = process.communicate(timeout=120)  # before the fix: never returns
    finally:
        process.kill()
    assert process.returncode == 1
    # The other decoding process may be busy with a file of its own at that moment: the message names both then.
    named = re.search(r"a decoding process died while these files were being decoded: (.+?)\. ", errors)
    assert named is not None, errors[-3000:]
    assert str(blocker.resolve()) in named.group(1).split(", ")
    assert "run the same command again to resume" in errors
    resumes_to_the_reference(blocker, reference, out, command)


def _process_opening_a_fifo(*, under: int) -> int | None:
    """The child of `under` that is blocked opening a FIFO (waiting in the kernel for the FIFO's other end)."""
    for task in Path("/proc").glob("[0-9]*"):
        try:
            status = (task / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            waiting_in = (task / "wchan").read_text()
        except (OSError, StopIteration):
            continue
        if parent == under and waiting_in == "wait_for_partner":
            return int(task.name)
    return None


@pytest.mark.parametrize(
    ("suffix", "rate", "channels"),
    [(".wav", 22_050, 1), (".mp3", 44_100, 2), (".ogg", 48_000, 2), (".flac", 16_000, 1)],
)
def test_decoding_in_blocks_gives_what_decoding_the_whole_file_gives(tmp_path, suffix, rate, channels):
    """The shard writer decodes block by block (bounded memory); across block boundaries, resampling included, the
    samples are exactly those of one whole-file read. (An MP3 read in pieces by libsndfile 1.2 is not: after a read
    that stops mid-file, a few hundred samples come out wrong, so MP3s are read whole.)"""
    path = tmp_path / f"input{suffix}"
    with sf.SoundFile(path, "w", rate, channels) as out:  # in pieces: libsndfile's Vorbis writer dislikes big ones
        for second in range(9):
            t = np.arange(second * rate, (second + 1) * rate) / rate  # steady sines: where MP3 reads went wrong
            out.write(np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1).astype(np.float32))
    whole = decode_file(path)
    blocks = list(decode_blocks(path, block_seconds=2.0))
    if suffix == ".mp3":
        assert len(blocks) == 1
    else:
        assert len(blocks) > 3
    assert np.array_equal(np.concatenate([block.audio for block in blocks]), whole.audio)
    assert {(block.original_rate, block.original_channels) for block in blocks} == {(rate, channels)}
