"""Raw audio -> 16 kHz mono FLAC clips in WebDataset tar shards, with a manifest and a list of rejected inputs.

The output folder holds `shard-000000.tar`, ..., `manifest.json` (written last: its presence means the set is
complete), `rejected.jsonl`, and while a run is in progress `progress.jsonl`, a journal with one line per finished
shard. Every shard is written under a `.partial` name and renamed when complete, so a killed run leaves only whole
shards; run again with the same arguments, it resumes after the last journalled shard, and because inputs are
sorted and keys derive from their paths, the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from tqdm import tqdm

from data import jsonlines
from data.audio import SAMPLE_RATE, Decoded, decode_blocks, encode_flac
from data.signals import ignore_stop_signals

LIST_SUFFIXES = {".txt", ".lst", ".list"}  # a text file naming one audio path per line
AUDIO_SUFFIXES = {f".{ext.lower()}" for ext in sf.available_formats()} | {
    ".wav",
    ".flac",
    ".ogg",
    ".oga",
    ".opus",
    ".mp3",
    ".aiff",
    ".aif",
}
SILENCE_PEAK = 1e-4  # -80 dBFS: a file whose loudest sample is below this is silence
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
PROGRESS = "progress.jsonl"
PARTS = "parts"  # a job array's parts, one folder each
NAMED_IN_FLIGHT = 3  # files named when a decoding process dies: the oldest first, the likeliest culprit


@dataclass(frozen=True)
class ShardParams:
    clip_seconds: float = 30.0  # the paper's 1k-hour subset is 30 s clips
    min_seconds: float = 5.0  # a shorter tail is dropped; 5 s is the paper's best crop
    max_count: int = 1000  # clips per shard
    max_bytes: int = 1_000_000_000  # bytes per shard (a shard closes at whichever bound comes first)

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds <= self.clip_seconds:
            raise ValueError(f"need 0 < --min-seconds ({self.min_seconds}) <= --clip-seconds ({self.clip_seconds})")
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("shard bounds must be positive")


@dataclass
class FileResult:
    index: int
    samples: list[dict[str, bytes | str]] = field(default_factory=list)  # webdataset samples, in clip order
    seconds: list[float] = field(default_factory=list)
    rejection: dict[str, Any] | None = None


def expand_inputs(sources: Iterable[str]) -> list[str]:
    """Files, folders (recursive), globs and list files -> sorted, de-duplicated audio paths."""
    found: set[str] = set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.update(str(p) for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            # Listed paths are taken as they are: one that is missing becomes a rejection, not a stop.
            lines = (line.strip() for line in path.read_text().splitlines())
            found.update(line for line in lines if line and not line.startswith("#"))
        elif path.is_file():
            found.add(str(path))
        else:
            matches = glob.glob(source, recursive=True)  # noqa: PTH207 - user-supplied patterns may be absolute
            if not matches:
                raise FileNotFoundError(f"{source}: no such file, folder or matching glob")
            found.update(expand_inputs(matches))
    return sorted(str(Path(p).resolve()) for p in found)


def clip_key(name: str, clip: int) -> str:
    """Stable across runs and machines for the same input name; no dots (webdataset splits keys from extensions)."""
    return f"{hashlib.sha1(name.encode()).hexdigest()[:16]}_{clip:05d}"  # noqa: S324 - a name, not security


def input_names(paths: list[str]) -> list[str]:
    """Each input's path below the folder all inputs share: the same corpus gives the same keys (and so the same
    crops, which the loader seeds by key) wherever it is mounted or copied."""
    if not paths:
        return []
    root = os.path.commonpath([Path(path).parent for path in paths])
    return [str(Path(path).relative_to(root)) for path in paths]


def read_labels(path: str) -> dict[str, Any]:
    """Labels from a sidecar `<name>.json` beside the audio file, if there is one."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"labels in {sidecar} are not valid JSON: {error}") from None


def process_file(job: tuple[int, str, str, ShardParams]) -> FileResult:
    """Decode one input, block by block, and cut it into clips; never raises for a bad file, returns its rejection
    instead. Memory holds a block of the input and the clips' FLAC bytes, whatever the input's length."""
    index, path, name, params = job
    result = FileResult(index)
    try:
        labels, labels_error = read_labels(path), None
    except ValueError as error:
        labels, labels_error = {}, str(error)
    try:
        peak, seconds = _cut_into_clips(result, path, name, params, labels)
    except Exception as error:  # noqa: BLE001 - any unreadable input is a rejection, never a crash
        result.rejection = {"reason": "unreadable", "detail": f"{type(error).__name__}: {error}"}
    else:
        if labels_error:
            result.rejection = {"reason": "invalid labels", "detail": labels_error}
        elif not np.isfinite(peak):
            result.rejection = {"reason": "non-finite samples"}
        elif seconds < params.min_seconds:
            result.rejection = {"reason": "too short", "detail": f"{seconds:.2f} s < {params.min_seconds} s"}
        elif peak < SILENCE_PEAK:
            result.rejection = {"reason": "silent"}
    if result.rejection:
        result.samples, result.seconds = [], []
    return result


def _cut_into_clips(
    result: FileResult, path: str, name: str, params: ShardParams, labels: dict[str, Any]
) -> tuple[float, float]:
    """Append the clips of `path` to `result` as its blocks are decoded: every whole clip, and a last one of at
    least `min_seconds`. Returns the input's peak (NaN once a sample is not finite, which stops it) and length."""
    clip_samples = round(params.clip_seconds * SAMPLE_RATE)
    waiting, offset, peak = np.empty(0, dtype=np.float32), 0, 0.0  # samples of the next clip, where it starts
    for block in decode_blocks(path):
        if not np.isfinite(block.audio).all():
            return float("nan"), 0.0
        peak = max(peak, float(np.abs(block.audio).max(initial=0.0)))
        waiting = np.concatenate([waiting, block.audio])
        while waiting.size >= clip_samples:
            _add_clip(result, waiting[:clip_samples], offset=offset, path=path, name=name, block=block, labels=labels)
            waiting, offset = waiting[clip_samples:], offset + clip_samples
    if waiting.size >= params.min_seconds * SAMPLE_RATE:
        _add_clip(result, waiting, offset=offset, path=path, name=name, block=block, labels=labels)
    return peak, (offset + waiting.size) / SAMPLE_RATE


def _add_clip(
    result: FileResult,
    piece: np.ndarray,
    *,
    offset: int,
    path: str,
    name: str,
    block: Decoded,
    labels: dict[str, Any],
) -> None:
    record = {
        "source": path,
        "offset": offset / SAMPLE_RATE,
        "duration": piece.size / SAMPLE_RATE,
        "sample_rate": SAMPLE_RATE,
        "original_sample_rate": block.original_rate,
        "original_channels": block.original_channels,
        "labels": labels,
    }
    clip = len(result.samples)
    result.samples.append(
        {"__key__": clip_key(name, clip), "flac": encode_flac(piece), "json": json.dumps(record, sort_keys=True)}
    )
    result.seconds.append(piece.size / SAMPLE_RATE)


class _Journal:
    """progress.jsonl: one line per finished shard, naming where the next shard starts (input index, clip index)."""

    def __init__(self, out: Path) -> None:
        self.path = out / PROGRESS

    def read(self) -> list[dict[str, Any]]:
        return jsonlines.read(self.path)

    def append(self, entry: dict[str, Any]) -> None:
        jsonlines.append(self.path, [entry])


class _ShardSink:
    """ShardWriter's opener and post hooks: shards are written as `.partial`, synced, renamed, then journalled."""

    def __init__(self, journal: _Journal, run_params: dict[str, Any], start: tuple[int, int]) -> None:
        self.journal = journal
        self.run_params = run_params
        self.next_position = start  # (input index, clip index) of the clip about to be written
        self.samples = 0
        self.seconds = 0.0
        self.abandoned = False  # the run failed: the open shard is dropped, as a kill would leave it
        self._files: dict[str, BinaryIO] = {}

    def open(self, fname: str) -> BinaryIO:
        self._files[fname] = Path(fname + ".partial").open("wb")  # noqa: SIM115 - closed in finish()
        return self._files[fname]

    def finish(self, fname: str) -> None:
        stream = self._files.pop(fname)  # webdataset does not close streams it did not open
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        partial = Path(fname + ".partial")
        if not self.samples or self.abandoned:
            partial.unlink()  # an abandoned shard is written again, whole, by the run that resumes
            return
        partial.replace(fname)
        entry = {"shard": Path(fname).name, "samples": self.samples, "seconds": round(self.seconds, 6)}
        self.journal.append({**entry, "next": list(self.next_position), "params": self.run_params})
        self.samples, self.seconds = 0, 0.0


@dataclass(frozen=True)
class Part:
    """One of `count` parts of a corpus, written by one task of a job array into its own folder under `parts/`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index} of {self.count}: need 0 <= index < count")

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def folder(self, out: Path) -> Path:
        return out / PARTS / self.name

    def holds(self, name: str) -> bool:
        """Whether the input called `name` (see `input_names`) is this part's: a stable hash of the name, the same
        on every machine and in every run, so each input belongs to exactly one part whatever order tasks run in."""
        return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % self.count == self.index  # noqa: S324


def write_shards(
    sources: Sequence[str],
    out: str | Path,
    params: ShardParams,
    *,
    jobs: int = 1,
    progress: bool = True,
    part: Part | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Shard `sources` into `out`; returns the manifest. Resumes an interrupted run over the same inputs.
    With `part`, only that part's inputs, into `out/parts/<part>/` (`data.shard_parts.merge_parts` joins them).
    `stop` is asked before each input's clips are written: once it says yes, ShardingStoppedError ends the run as a
    kill would, with every finished shard journalled, and the same call resumes it."""
    out = Path(out)
    paths = expand_inputs(sources)
    names = input_names(paths)  # over the whole corpus: a part's keys are those of a single run
    run_params = run_parameters(paths, params, part)
    if part is None:
        if (out / PARTS).exists():
            raise FileExistsError(f"{out / PARTS}: this folder holds the parts of a job array; use an empty folder")
    else:
        mine = [index for index, name in enumerate(names) if part.holds(name)]
        paths, names, out = [paths[i] for i in mine], [names[i] for i in mine], part.folder(out)
    return _write(paths, names, out, params, run_params, jobs=jobs, progress=progress, stop=stop or (lambda: False))


def run_parameters(paths: list[str], params: ShardParams, part: Part | None = None) -> dict[str, Any]:
    """What identifies a run (and each part of an array run): journals and manifests record it; a resume must match."""
    run = {**asdict(params), "inputs": len(paths), "inputs_digest": _digest(paths)}
    return run if part is None else run | {"part": [part.index, part.count]}


def _write(
    paths: list[str],
    names: list[str],
    out: Path,
    params: ShardParams,
    run_params: dict[str, Any],
    *,
    jobs: int,
    progress: bool,
    stop: Callable[[], bool],
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        raise FileExistsError(f"{out / MANIFEST} exists: this folder already holds a finished shard set")
    journal = _Journal(out)
    done = journal.read()
    check_same_run(out, done, run_params)
    start_file, start_clip = done[-1]["next"] if done else (0, 0)
    rejections = _kept_rejections(out, before=start_file)
    jsonlines.rewrite(out / REJECTED, rejections)

    sink = _ShardSink(journal, run_params, start=(start_file, start_clip))
    writer = wds.ShardWriter(
        str(out / "shard-%06d.tar"),
        maxcount=params.max_count,
        maxsize=params.max_bytes,
        post=sink.finish,
        start_shard=len(done),
        verbose=0,
        opener=sink.open,
        mtime=0.0,  # identical inputs give byte-identical tars
    )
    with writer:
        todo = [(index, paths[index], names[index], params) for index in range(start_file, len(paths))]
        results = processed_in_order(todo, jobs=jobs)
        try:
            for result in tqdm(results, total=len(todo), desc="shard", unit="file", disable=not progress):
                _check_stop(stop, out, paths[result.index])
                if result.rejection:
                    rejection = {"index": result.index, "path": paths[result.index], **result.rejection}
                    rejections.append(rejection)
                    jsonlines.append(out / REJECTED, [rejection])
                first_clip = start_clip if result.index == start_file else 0
                for clip, (sample, seconds) in enumerate(zip(result.samples, result.seconds, strict=True)):
                    if clip < first_clip:
                        continue
                    sink.next_position = (result.index, clip)
                    writer.write(sample)
                    sink.samples += 1
                    sink.seconds += seconds
        except BaseException:
            sink.abandoned = True  # closing the writer must not journal a shard cut short
            raise
        sink.next_position = (len(paths), 0)
    return _write_manifest(out, journal.read(), run_params, rejections)


def processed_in_order(todo: list[tuple[int, str, str, ShardParams]], *, jobs: int) -> Iterator[FileResult]:
    """`process_file` of each job, in order, by `jobs` processes, at most two jobs each ahead of the consumer (so
    results never pile up in memory). A process that dies (the out-of-memory killer) ends this with
    WorkerDiedError, rather than leaving the results it owed awaited forever."""
    if jobs <= 1:
        yield from map(process_file, todo)
        return
    with _Decoders(jobs) as decoders:
        waiting = iter(enumerate(todo))
        finished: dict[int, FileResult] = {}
        for position in range(len(todo)):
            decoders.assign(waiting)
            while position not in finished:
                finished.update(decoders.collect())
            yield finished.pop(position)


class _Decoders:
    """Decoding processes, each fed through a pipe of its own: its results come back in the order of its jobs, and
    its death shows at once as the end of that pipe (a shared pool's queues hide it: concurrent.futures could wait
    forever for a result when one of its processes was killed mid-message, or ignored its SIGTERM)."""

    AHEAD = 2  # jobs sent to a process before its first result is back

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        self.pipes, self.processes = [], []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_decode_jobs, args=(theirs,), daemon=True)
            process.start()
            theirs.close()  # the process's end lives in the process alone: its death ends the pipe
            self.pipes.append(ours)
            self.processes.append(process)
        self.outstanding: list[deque[tuple[int, str]]] = [deque() for _ in range(count)]  # (position, path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        for pipe, process, outstanding in zip(self.pipes, self.processes, self.outstanding, strict=True):
            if outstanding or not process.is_alive():
                process.kill()  # stopped early: what it was decoding is not needed
            else:
                with contextlib.suppress(OSError):
                    pipe.send(None)
            process.join()
            pipe.close()

    def assign(self, waiting: Iterator[tuple[int, tuple[int, str, str, ShardParams]]]) -> None:
        """Give each process jobs until it has AHEAD outstanding (or none are left)."""
        for worker, outstanding in enumerate(self.outstanding):
            for position, job in itertools.islice(waiting, self.AHEAD - len(outstanding)):
                self.pipes[worker].send(job)
                outstanding.append((position, job[1]))

    def collect(self) -> dict[int, FileResult]:
        """The results that are ready (waiting for one), by position; WorkerDiedError when a process died."""
        busy = [worker for worker, outstanding in enumerate(self.outstanding) if outstanding]
        watched = [self.pipes[worker] for worker in busy] + [self.processes[worker].sentinel for worker in busy]
        ready = set(multiprocessing.connection.wait(watched))
        results = {}
        for worker in busy:
            if self.pipes[worker] in ready:
                results.update(self._receive(worker))
            elif self.processes[worker].sentinel in ready:
                raise self._died()
        return results

    def _receive(self, worker: int) -> dict[int, FileResult]:
        try:
            outcome, value = self.pipes[worker].recv()
        except (EOFError, OSError):  # the process died, maybe halfway through sending
            raise self._died() from None
        position, _ = self.outstanding[worker].popleft()
        if outcome == "error":
            raise value
        return {position: value}

    def _died(self) -> WorkerDiedError:
        in_flight = sorted(entry for outstanding in self.outstanding for entry in outstanding)
        return WorkerDiedError(_worker_died([path for _, path in in_flight]))


def _decode_jobs(pipe: multiprocessing.connection.Connection) -> None:
    """A decoding process: jobs in, results out, until told to stop (None) or the pipe ends."""
    _start_worker()
    while (job := pipe.recv()) is not None:
        pipe.send(_outcome(job))


def _outcome(job: tuple[int, str, str, ShardParams]) -> tuple[str, Any]:
    try:
        return "result", process_file(job)
    except Exception as error:  # noqa: BLE001 - the writer re-raises it as it would its own
        return "error", error


def _check_stop(stop: Callable[[], bool], out: Path, next_path: str) -> None:
    if stop():
        raise ShardingStoppedError(f"{out}: stopped before {next_path}; the same call resumes there")


class ShardingStoppedError(RuntimeError):
    """`write_shards` was asked to stop; what it finished is journalled, and the same call resumes it."""


class WorkerDiedError(RuntimeError):
    """A decoding process was killed; what was written before is kept and the run resumes from it."""


def _worker_died(in_flight: list[str]) -> str:
    named = ", ".join(in_flight[:NAMED_IN_FLIGHT]) + (", ..." if len(in_flight) > NAMED_IN_FLIGHT else "")
    return (
        f"a decoding process died while these files were being decoded: {named}. The system killed it, most often"
        " for lack of memory (dmesg says). The shards written so far are kept: run the same command again to"
        " resume, with fewer --jobs if memory is short"
    )


def _start_worker() -> None:
    torch.set_num_threads(1)  # the pool is the parallelism; torch's own threads would oversubscribe the cores
    ignore_stop_signals()  # the writer decides when to stop; a worker killed by a job's signal would break the pool


def _digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


def journal_entries(out: Path) -> list[dict[str, Any]]:
    """The finished shards an interrupted run into `out` journalled (none for a new or finished folder)."""
    return _Journal(out).read()


def check_same_run(out: Path, done: list[dict[str, Any]], run_params: dict[str, Any]) -> None:
    """Refuse to continue into `out` what another run started there (other inputs or parameters, or shards of its
    own); `done`: `out`'s journal."""
    if done and done[-1]["params"] != run_params:
        raise ValueError(
            f"{out / PROGRESS} records an interrupted run with other inputs or parameters ({done[-1]['params']});"
            " re-run with those, or write to an empty folder"
        )
    # The shard after the last journalled one may exist if a kill came between its rename and its journal line;
    # it is rewritten identically. Any other shard belongs to some other run.
    expected = {entry["shard"] for entry in done} | {f"shard-{len(done):06d}.tar"}
    strangers = sorted(p.name for p in out.glob("shard-*.tar") if p.name not in expected)
    if strangers:
        raise FileExistsError(f"{out} holds shards this run did not write ({strangers[:3]}); use an empty folder")


def _kept_rejections(out: Path, *, before: int) -> list[dict[str, Any]]:
    """Rejections recorded for inputs before the resume point (later ones are found again)."""
    return [entry for entry in jsonlines.read(out / REJECTED) if entry["index"] < before]


def _write_manifest(
    out: Path, shards: list[dict[str, Any]], run_params: dict[str, Any], rejections: list[dict[str, Any]]
) -> dict[str, Any]:
    manifest = {
        "shards": [{"url": s["shard"], "samples": s["samples"], "seconds": s["seconds"]} for s in shards],
        "total_samples": sum(s["samples"] for s in shards),
        "total_seconds": round(sum(s["seconds"] for s in shards), 6),
        "sample_rate": SAMPLE_RATE,
        "params": run_params,
        "rejected": len(rejections),
    }
    jsonlines.write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out / PROGRESS).unlink()
    return manifest
