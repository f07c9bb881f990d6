"""Corpus sharding as a job array: `music2vec shard SRC… --out DIR --executor slurm|local --array N`.

Task i writes part i of the corpus (`data.shard_parts`) with the task's CPUs as decoding processes. A task that
reaches its time limit or is preempted is requeued and resumes its part from the part's journal. Whichever task
finds every part finished joins them into one manifest; should none (a task failed and was run again by hand, say),
`music2vec shard --merge DIR` does. Everything a task would fail on is checked before the array is queued, and
running the same command again queues only the parts that are not finished.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from cluster.config import ClusterConfig
from cluster.job import submitit_requeue_signal
from cluster.submit import check_submittable, log_folder, submit_array
from data.shard_parts import check_array_output, merge_parts, unfinished, writing
from data.shards import MANIFEST, Part, ShardingStoppedError, ShardParams, write_shards
from trainer.stop import StopFlag

JOBS = "jobs"  # the tasks' logs, one folder per task, inside the output folder


@dataclass(frozen=True)
class ShardArray:
    sources: tuple[str, ...]  # absolute: a task may start in another directory
    out: Path  # absolute
    params: ShardParams
    parts: int
    cluster: ClusterConfig  # one task per part; its CPUs are its decoding processes

    @property
    def log_folder(self) -> Path:
        return log_folder(self.out / JOBS, self.cluster)


class ShardPartJob(submitit.helpers.Checkpointable):
    """What one array task runs: its part (resuming it, after a requeue), then the merge if every part is done.

    submitit answers the time-limit signal from inside its handler, by raising SystemExit wherever the task happens
    to be; inside a decoder's C callback that exception is swallowed and the task runs on until SLURM kills it. So
    the signal only sets a flag here; the writer stops before its next input, and then submitit's handler is called
    to requeue this same object. SIGTERM (scancel) stops the task without requeueing."""

    def __init__(self, array: ShardArray, part: Part) -> None:
        self.array = array
        self.part = part

    def __call__(self) -> dict[str, Any]:
        requeue_signal = submitit_requeue_signal()
        submitit_requeue = signal.getsignal(requeue_signal)
        stop = StopFlag()
        stop.install()
        try:
            self._write_part(stop)
        except ShardingStoppedError:
            stop.uninstall()
            if requeue_signal in stop.signals and callable(submitit_requeue):
                submitit_requeue(requeue_signal, None)  # resubmits this object, requeues the task and exits
            raise
        stop.uninstall()
        # Every task writes its part's manifest before it looks at the others', so the last one to finish sees all.
        merged = not unfinished(self.array.out, self.array.parts)
        if merged:
            merge_parts(self.array.out)
        return {"part": self.part.name, "merged": merged}

    def _write_part(self, stop: StopFlag) -> None:
        array, folder = self.array, self.part.folder(self.array.out)
        if (folder / MANIFEST).is_file():
            return  # finished by an earlier attempt
        job = submitit.JobEnvironment()
        with writing(folder, f"job {job.job_id} on {socket.gethostname()} (pid {os.getpid()})"):
            write_shards(
                array.sources,
                array.out,
                array.params,
                jobs=array.cluster.cpus_per_task,
                progress=False,
                part=self.part,
                stop=lambda: stop.reason is not None,
            )


def submit(array: ShardArray) -> list[submitit.Job]:
    """Queue a task per unfinished part, after checking everything they need; none when every part is finished."""
    check_submittable(array.cluster, option="--executor")
    todo = check_array_output(array.sources, array.out, array.params, array.parts)
    if not todo:
        return []
    jobs = [ShardPartJob(array, part) for part in todo]
    return submit_array(jobs, array.cluster, array.log_folder, max_requeues=array.cluster.max_requeues)
