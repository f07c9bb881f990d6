"""One owner per run directory: its lease names the process or job that writes into it.

Two runs in one directory would overwrite each other's checkpoints, so whoever trains (rank 0 of `music2vec train`,
or of a launched job) or submits (`music2vec launch`, until its job takes over) holds the lease:

    leases/000000007.json   {"token": "…", "command": "train", "host": "node7", "pid": 4242, "started": 1094128,
                             "job_id": "55608752", "executor": "slurm", "restart": 0, "since": 1764558000.0}

A lease is free when its holder is gone: its SLURM job has left the queue, or its process no longer runs on this
host. When that cannot be known (the scheduler does not answer, the process runs on another host), the run directory
counts as busy unless the user passes `--take-over`. A job takes over the lease of its own job id: the one its
launcher wrote at submission, or its previous attempt's after a requeue.

The lease is a sequence of numbered generations, and the newest one counts. A claimant that finds the newest free
(released, or its holder gone) writes the next one: in full to a draft, then hard-linked to the generation's name,
which fails if that name exists — atomic on local and network filesystems alike, and no lock is needed. Of any
number of simultaneous claimants exactly one creates it; the others find it and judge its holder alive. Nothing is
ever overwritten or moved, so no claimant can undo another's claim; older generations are removed once superseded,
and a release is a generation that holds nobody. The holder checks that its generation is still the newest before
each checkpoint: a run whose lease was taken over (`--take-over` while it was in fact alive) stops before writing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

from cluster.status import ACTIVE_STATES, process_alive, process_started, slurm_state
from data import jsonlines
from trainer.layout import LEASES

DAMAGED = "damaged"  # the token of a lease file that does not parse
GENERATION = re.compile(r"\d{9}\.json")
CLAIM_ROUNDS = 1000  # rounds of "judge the newest holder, create the next generation" before giving up
HANDOVER_WAIT_S = 60.0  # how long a job waits for its launcher to write the job id into the lease


class RunDirBusyError(ValueError):
    """The run directory is held by a run that is, or may be, alive."""


class Liveness(Enum):
    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Holder:
    token: str
    command: str  # "train" or "launch"
    host: str
    pid: int | None  # None: a submitted job that has not started yet
    started: int | None  # the process's start time (process_started): a reused pid is not the holder
    job_id: str | None
    executor: str | None  # "slurm", "local" (submitit's local processes), None: not a job
    restart: int | None  # which attempt of the job (SLURM_RESTART_COUNT); a later attempt succeeds an earlier one
    since: float

    @classmethod
    def this_process(cls, command: str, *, job_id: str | None, executor: str | None, restart: int | None) -> Holder:
        pid, host = os.getpid(), socket.gethostname()
        return cls(uuid.uuid4().hex, command, host, pid, process_started(pid), job_id, executor, restart, time.time())

    def describe(self) -> str:
        if self.token == DAMAGED:
            return "an unreadable lease (not written by music2vec, or damaged)"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        process = f"pid {self.pid} on {self.host}, " if self.pid is not None else ""
        job = f"{self.executor} job {self.job_id}, " if self.job_id else ""
        return f"music2vec {self.command} ({process}{job}since {since})"

    def liveness(self, claimant: Holder) -> tuple[Liveness, str]:
        """Whether this holder may still write into the run directory, as `claimant` can tell, and how."""
        succeeded = self._succeeded_by(claimant)
        if succeeded:
            return Liveness.GONE, succeeded
        here = self.host == socket.gethostname() and self.pid is not None
        if here and not process_alive(self.pid, self.started):
            return Liveness.GONE, f"process {self.pid} on {self.host} is gone"
        if self.job_id is not None and self.executor == "slurm":
            state = slurm_state(self.job_id)
            if state is not None:
                return (Liveness.ALIVE if state in ACTIVE_STATES else Liveness.GONE), f"job {self.job_id} is {state}"
            if not here:
                return Liveness.UNKNOWN, "the SLURM scheduler did not answer (squeue)"
        if here:
            return Liveness.ALIVE, f"process {self.pid} is running"
        return Liveness.UNKNOWN, f"its process runs on {self.host}, which this machine cannot look into"

    def _succeeded_by(self, claimant: Holder) -> str | None:
        """Why `claimant` succeeds this holder within one job (its launcher, or an earlier attempt), if it does."""
        if self.job_id is None or (self.job_id, self.executor) != (claimant.job_id, claimant.executor):
            return None
        if self.command == "launch":
            return f"it submitted job {self.job_id}, which has started"
        if self.restart is not None and claimant.restart is not None and self.restart < claimant.restart:
            return f"attempt {self.restart} of job {self.job_id} ended before this one started"
        return None


class Lease:
    """This process's claim on a run directory: `claim` it, check it is not `lost` before writing, `release` it."""

    def __init__(
        self,
        command: str,
        *,
        job_id: str | None = None,
        executor: str | None = None,
        restart: int | None = None,
        take_over: bool = False,
    ) -> None:
        self.holder = Holder.this_process(command, job_id=job_id, executor=executor, restart=restart)
        self.take_over = take_over
        self.folder: Path | None = None  # set once claimed ...
        self.generation = -1  # ... with the number of the generation this process wrote

    def claim(self, run_dir: Path) -> str | None:
        """Hold `run_dir` (which exists); what was taken over from whom, if anything. Raises RunDirBusyError naming
        the holder when the run directory is held by a run that is or may be alive."""
        folder = run_dir / LEASES
        taken_over = None
        handover_deadline = time.monotonic() + HANDOVER_WAIT_S
        for _ in range(CLAIM_ROUNDS):
            generation, current = newest(folder)
            if current is not None:
                liveness, reason = current.liveness(self.holder)
                if self._launcher_handing_over(current) and time.monotonic() < handover_deadline:
                    time.sleep(0.2)  # a job that started before its launcher wrote the job id into the lease
                    continue
                if liveness is Liveness.ALIVE or (liveness is Liveness.UNKNOWN and not self.take_over):
                    raise RunDirBusyError(busy_message(run_dir, current, liveness, reason))
                taken_over = f"took over {run_dir} from {current.describe()}: {reason}"
            if _create(folder, generation + 1, asdict(self.holder)):
                self.folder, self.generation = folder, generation + 1
                return taken_over
            taken_over = None  # another claimant made that generation first: judge it in the next round
        raise RunDirBusyError(f"{folder}: others kept claiming it at the same moment; try again")

    def _launcher_handing_over(self, current: Holder) -> bool:
        return self.holder.job_id is not None and current.command == "launch" and current.job_id is None

    def hand_to_job(self, job_id: str, executor: str, *, pid: int | None) -> None:
        """After submitting: the lease is the job's now, which takes it over when it starts. `pid`: the process that
        stands for the job until then (a local job's controller); None for a SLURM job, which its state stands for."""
        assert self.folder is not None, "claim the lease first"
        started = process_started(pid) if pid is not None else None
        self.holder = replace(self.holder, job_id=job_id, executor=executor, pid=pid, started=started)
        jsonlines.rewrite(_path(self.folder, self.generation), [asdict(self.holder)])  # only its writer rewrites it

    def lost(self) -> str | None:
        """Why this process no longer holds its run directory (someone took the lease over), or None."""
        if self.folder is None:
            return None
        generation, current = newest(self.folder)
        if generation == self.generation:
            return None
        holder = current.describe() if current else "nobody (it was released)"
        return (
            f"{self.folder.parent} is now held by {holder}: another run took this run directory over, so this one"
            " stops"
        )

    def release(self) -> None:
        """Give the run directory up, if this process still holds it: a generation that holds nobody."""
        if self.folder is not None and self.lost() is None:
            _create(self.folder, self.generation + 1, {"released_by": self.holder.token, "since": time.time()})
        self.folder = None


def holder(run_dir: Path) -> Holder | None:
    """Who holds `run_dir` now, if anyone."""
    return newest(run_dir / LEASES)[1]


def check_free(run_dir: Path, *, take_over: bool = False) -> None:
    """What `claim` would refuse to `music2vec launch`, without claiming anything (a dry run)."""
    current = holder(run_dir)
    if current is None:
        return
    liveness, reason = current.liveness(Holder.this_process("launch", job_id=None, executor=None, restart=None))
    if liveness is Liveness.ALIVE or (liveness is Liveness.UNKNOWN and not take_over):
        raise RunDirBusyError(busy_message(run_dir, current, liveness, reason))


def busy_message(run_dir: Path, holder: Holder, liveness: Liveness, reason: str) -> str:
    if holder.job_id and holder.executor == "slurm" and liveness is Liveness.ALIVE:
        return (
            f"{run_dir} already has job {holder.job_id} ({reason.rsplit(' ', 1)[-1]}), held by {holder.describe()};"
            f" wait for it, or cancel it (scancel {holder.job_id}) and launch again to resume"
        )
    if liveness is Liveness.ALIVE:
        return (
            f"{run_dir} is in use by {holder.describe()} ({reason}); wait for it, or stop it and run again to resume"
        )
    return (
        f"{run_dir} may be in use by {holder.describe()}: {reason}. Two runs in one directory would overwrite each"
        " other's checkpoints; if you are sure it has ended, pass --take-over"
    )


def newest(folder: Path) -> tuple[int, Holder | None]:
    """The newest generation of the lease (-1: none yet) and its holder (None: released, or never held)."""
    while True:
        generations = sorted(int(path.stem) for path in folder.glob("*.json") if GENERATION.fullmatch(path.name))
        if not generations:
            return -1, None
        try:
            text = _path(folder, generations[-1]).read_bytes()
        except FileNotFoundError:
            continue  # superseded and removed since it was listed: list again
        return generations[-1], _holder_in(text)


def _holder_in(text: bytes) -> Holder | None:
    try:
        fields = json.loads(text)
        return None if "released_by" in fields else Holder(**fields)
    except (ValueError, TypeError):  # never written like this by a claim: edited by hand, or the disk failed
        return Holder(DAMAGED, "?", "?", None, None, None, None, None, 0.0)


def _path(folder: Path, generation: int) -> Path:
    return folder / f"{generation:09d}.json"


def _create(folder: Path, generation: int, content: dict[str, object]) -> bool:
    """Write generation `generation` of the lease unless it exists: the one atomic step that decides between
    claimants. It appears only once written in full (a draft hard-linked into place); older generations go."""
    folder.mkdir(exist_ok=True)
    draft = folder / f"draft-{uuid.uuid4().hex}"
    jsonlines.rewrite(draft, [content])
    try:
        os.link(draft, _path(folder, generation))
    except FileExistsError:
        return False
    finally:
        draft.unlink(missing_ok=True)
    jsonlines.fsync_folder(folder)
    for older in folder.glob("*.json"):
        if GENERATION.fullmatch(older.name) and int(older.stem) < generation:
            older.unlink(missing_ok=True)
    return True
