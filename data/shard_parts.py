"""A corpus sharded by a job array: N parts, each a complete shard set of its own, joined by one manifest at the top.

    OUT/
      parts/part-00000-of-00008/   shard-000000.tar ..., manifest.json, rejected.jsonl: what `music2vec shard`
      parts/part-00001-of-00008/   writes, for the inputs whose name hashes to that part (`Part.holds`)
      ...
      rejected.jsonl               every part's rejected inputs
      manifest.json                every part's shards, URLs relative to OUT; written last, once every part is done

Each part resumes on its own, as a single run does, and keys clips exactly as a single run over the whole corpus
would, so the training data is the same whether it was sharded by one process or by many. The same inputs and N give
byte-identical output.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data import jsonlines
from data.audio import SAMPLE_RATE
from data.shards import (
    MANIFEST,
    PARTS,
    REJECTED,
    Part,
    ShardParams,
    check_same_run,
    expand_inputs,
    journal_entries,
    run_parameters,
)

LOCK = ".writing"  # in each part's folder
_PART_FOLDER = re.compile(r"part-(\d{5})-of-(\d{5})")


def part_count(out: Path) -> int | None:
    """Into how many parts `out` was split (None: it holds no parts); a folder holding two splits is refused."""
    counts = {int(m.group(2)) for folder in (out / PARTS).glob("part-*") if (m := _PART_FOLDER.fullmatch(folder.name))}
    if len(counts) > 1:
        raise ValueError(f"{out / PARTS}: holds parts of splits into {sorted(counts)} parts; use an empty folder")
    return counts.pop() if counts else None


def unfinished(out: Path, count: int) -> list[Part]:
    """The parts of an N-part split of `out` that have no manifest yet."""
    parts = [Part(index, count) for index in range(count)]
    return [part for part in parts if not (part.folder(out) / MANIFEST).is_file()]


def check_array_output(sources: Sequence[str], out: Path, params: ShardParams, count: int) -> list[Part]:
    """What would stop an array task, checked before anything is queued; returns the parts still to write.

    The inputs exist, `out` is writable and holds no finished set, no single run's shards and no split into another
    number of parts, and every part begun there was begun over the same inputs with the same parameters."""
    if count < 1:
        raise ValueError(f"--array {count}: need at least one part")
    paths = expand_inputs(sources)  # names the first source that does not exist
    if not paths:
        raise FileNotFoundError(f"no audio files in {list(sources)}")
    if (out / MANIFEST).is_file():
        raise FileExistsError(f"{out / MANIFEST} exists: this folder already holds a finished shard set")
    if any(out.glob("shard-*.tar")) or (out / "progress.jsonl").exists():
        raise FileExistsError(f"{out}: holds the shards of a run that was not split into parts; use an empty folder")
    found = part_count(out)
    if found not in (None, count):
        raise ValueError(
            f"{out / PARTS}: holds a split into {found} parts; run with --array {found}, or use another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: not writable by this user; choose another --out")
    todo = unfinished(out, count)
    for part in todo:
        check_same_run(part.folder(out), journal_entries(part.folder(out)), run_parameters(paths, params, part))
        if part.folder(out).is_dir():  # begun: nobody may be writing it now, or it would be written twice at once
            with writing(part.folder(out), "the check before queueing"):
                pass
    return todo


@contextmanager
def writing(folder: Path, holder: str) -> Iterator[None]:
    """Hold `folder`'s lock (flock: on NFS, Linux turns it into a lock that every host sees) while writing a part;
    a second writer is refused with the first one's name. The system drops the lock when its holder dies; the file
    goes when its holder is done, so a finished part holds exactly what a single run writes."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            raise FileExistsError(
                f"{folder}: being written by {handle.read().strip() or 'another process'}; wait for it to end, or"
                " cancel it, then run the same command again"
            ) from None
        handle.truncate(0)
        handle.write(holder)
        handle.flush()
        try:
            yield
        finally:
            (folder / LOCK).unlink()


def merge_parts(out: Path) -> dict[str, Any]:
    """Write OUT/rejected.jsonl, then OUT/manifest.json, from the manifests of every part; returns the manifest.
    Several tasks may merge at once: they write the same bytes, each through its own temporary file."""
    count = part_count(out)
    if count is None:
        raise FileNotFoundError(f"{out / PARTS}: no parts to merge; write them with `music2vec shard --array N`")
    missing = unfinished(out, count)
    if missing:
        raise ValueError(
            f"{out}: {len(missing)} of {count} parts are not finished ({_some(part.name for part in missing)});"
            " run the same `music2vec shard` command again to finish them"
        )
    parts = [Part(index, count) for index in range(count)]
    manifests = [json.loads((part.folder(out) / MANIFEST).read_text()) for part in parts]
    common = _common_params(out, parts, manifests)
    rejections = [
        {"part": part.name, **entry} for part in parts for entry in jsonlines.read(part.folder(out) / REJECTED)
    ]
    shards = [
        {**shard, "url": f"{PARTS}/{part.name}/{shard['url']}"}
        for part, manifest in zip(parts, manifests, strict=True)
        for shard in manifest["shards"]
    ]
    manifest = {
        "shards": shards,
        "total_samples": sum(shard["samples"] for shard in shards),
        "total_seconds": round(sum(shard["seconds"] for shard in shards), 6),
        "sample_rate": SAMPLE_RATE,
        "params": common | {"parts": count},
        "rejected": len(rejections),
    }
    jsonlines.rewrite(out / REJECTED, rejections)
    jsonlines.write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _some(names: Iterable[str], shown: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _common_params(out: Path, parts: list[Part], manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The run parameters every part shares (all but its place in the split); parts of different runs are refused."""
    shared = [{key: value for key, value in m["params"].items() if key != "part"} for m in manifests]
    for part, params in zip(parts, shared, strict=True):
        if params != shared[0]:
            raise ValueError(
                f"{part.folder(out) / MANIFEST}: written over other inputs or with other parameters than"
                f" {parts[0].name} ({params} vs {shared[0]}); these parts cannot be merged"
            )
    return shared[0]
