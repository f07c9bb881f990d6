"""A corpus sharded in parts, as a job array's tasks write it: every clip of a single run, under the same keys, in
exactly one part; one manifest and one list of rejections once every part is done; the same output for the same
inputs and number of parts; everything a task would fail on refused before anything is queued."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_PARAMS, write_corpus
from test_shards import members

from data.loader import shard_urls
from data.shard_parts import check_array_output, merge_parts, writing
from data.shards import Part, expand_inputs, input_names, write_shards

MUSIC2VEC = str(Path(sys.executable).parent / "music2vec")
PARTS = 3


def write_parts(sources: list[str], out: Path, parts: int = PARTS) -> dict:
    for index in range(parts):
        write_shards(sources, out, TEST_PARAMS, progress=False, part=Part(index, parts))
    return merge_parts(out)


def clips(manifest: Path) -> dict[str, bytes]:
    """Every member of every shard the manifest lists, by name (key.flac, key.json)."""
    found: dict[str, bytes] = {}
    for url in shard_urls(str(manifest)):
        found.update(members(Path(url)))
    return found


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` but the jobs' logs, by relative path."""
    files = (path for path in sorted(folder.rglob("*")) if path.is_file() and "jobs" not in path.parts)
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


@pytest.fixture(scope="module")
def split(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split")
    write_parts([str(corpus)], out)
    return out


def test_the_parts_hold_every_clip_of_a_single_run_under_the_same_keys(corpus, shards, split):
    assert clips(split / "manifest.json") == clips(shards / "manifest.json")
    manifest = json.loads((split / "manifest.json").read_text())
    single = json.loads((shards / "manifest.json").read_text())
    assert (manifest["total_samples"], manifest["total_seconds"]) == (single["total_samples"], single["total_seconds"])
    assert manifest["params"] == single["params"] | {"parts": PARTS}

    names = input_names(expand_inputs([str(corpus)]))
    owners = [[index for index in range(PARTS) if Part(index, PARTS).holds(name)] for name in names]
    assert all(len(owner) == 1 for owner in owners), "every input belongs to exactly one part"
    assert {owner[0] for owner in owners} == set(range(PARTS)), "16 inputs over 3 parts: none is empty"
    for index in range(PARTS):
        sources = {
            json.loads(data)["source"]
            for url in shard_urls(str(Part(index, PARTS).folder(split) / "manifest.json"))
            for name, data in members(Path(url)).items()
            if name.endswith(".json")
        }
        mine = {str(Path(corpus, name).resolve()) for name in names if Part(index, PARTS).holds(name)}
        assert sources == mine


def test_the_same_inputs_and_parts_give_byte_identical_output(corpus, split, tmp_path):
    write_parts([str(corpus)], tmp_path)
    assert tree(tmp_path) == tree(split)


def test_rejections_of_every_part_are_merged(tmp_path):
    write_corpus(tmp_path / "corpus", files=6)
    (tmp_path / "corpus" / "broken.wav").write_bytes(b"RIFF, but nothing after it")
    manifest = write_parts([str(tmp_path / "corpus")], tmp_path / "out")
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert manifest["rejected"] == 1
    assert [(Path(entry["path"]).name, entry["reason"]) for entry in rejected] == [("broken.wav", "unreadable")]
    owner = next(index for index in range(PARTS) if Part(index, PARTS).holds("broken.wav"))
    assert rejected[0]["part"] == Part(owner, PARTS).name


def test_a_merge_before_every_part_is_done_names_the_missing_ones(corpus, tmp_path):
    write_shards([str(corpus)], tmp_path, TEST_PARAMS, progress=False, part=Part(1, PARTS))
    missing = "2 of 3 parts are not finished (part-00000-of-00003, part-00002-of-00003)"
    with pytest.raises(ValueError, match=re.escape(missing)):
        merge_parts(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_what_a_task_would_fail_on_is_refused_before_queueing(corpus, shards, split, tmp_path):
    sources = [str(corpus)]
    with pytest.raises(FileNotFoundError, match=re.escape("nowhere/*.wav: no such file")):
        check_array_output([str(tmp_path / "nowhere" / "*.wav")], tmp_path / "out", TEST_PARAMS, PARTS)
    with pytest.raises(FileExistsError, match="already holds a finished shard set"):
        check_array_output(sources, split, TEST_PARAMS, PARTS)
    unsplit = tmp_path / "unsplit"
    shutil.copytree(shards, unsplit)
    (unsplit / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match="not split into parts"):
        check_array_output(sources, unsplit, TEST_PARAMS, PARTS)
    begun = tmp_path / "begun"
    write_shards(sources, begun, TEST_PARAMS, progress=False, part=Part(0, 2))
    with pytest.raises(ValueError, match="holds a split into 2 parts; run with --array 2"):
        check_array_output(sources, begun, TEST_PARAMS, PARTS)
    interrupted = Part(2, PARTS).folder(tmp_path / "interrupted")  # by a run over other inputs
    interrupted.mkdir(parents=True)
    journal = {"shard": "shard-000000.tar", "next": [1, 0], "params": {"inputs": 3}}
    (interrupted / "progress.jsonl").write_text(json.dumps(journal) + "\n")
    with pytest.raises(ValueError, match=r"part-00002-of-00003/progress\.jsonl records an interrupted run with other"):
        check_array_output(sources, tmp_path / "interrupted", TEST_PARAMS, PARTS)


@pytest.mark.slow
def test_a_local_job_array_queues_only_unfinished_parts_and_merges(corpus, split, tmp_path):
    """The command a user types, with local processes for SLURM's array tasks: a part already finished is not
    queued again, the last task merges, and the result is the same bytes as parts written in one process."""
    out = tmp_path / "out"
    write_shards([str(corpus)], out, TEST_PARAMS, progress=False, part=Part(1, PARTS))
    flags = ["--clip-seconds=6", "--min-seconds=5.5", "--shard-max-count=4", "--jobs=1"]
    command = [MUSIC2VEC, "shard", str(corpus), "--out", str(out), *flags, "--executor=local", f"--array={PARTS}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 of {PARTS} parts" in result.stdout
    assert "32 clips" in result.stdout
    assert tree(out) == tree(split)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 2
    assert "already holds a finished shard set" in again.stderr


def test_a_part_being_written_is_not_queued_or_written_again(corpus, tmp_path):
    """The same command run again while the first array still runs: the part a task holds is refused by name."""
    folder = Part(0, PARTS).folder(tmp_path)
    with writing(folder, "job 123_0 on m2v-node1 (pid 42)"):
        with pytest.raises(FileExistsError, match=re.escape(f"{folder}: being written by job 123_0 on m2v-node1")):
            check_array_output([str(corpus)], tmp_path, TEST_PARAMS, PARTS)
        with pytest.raises(FileExistsError, match="being written by job 123_0"), writing(folder, "a second task"):
            pass
    assert [part.index for part in check_array_output([str(corpus)], tmp_path, TEST_PARAMS, PARTS)] == [0, 1, 2]
