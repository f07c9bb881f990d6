"""What every task of a launched job runs: join the process group, train, and requeue when the cluster asks.

submitit relays SLURM's warning signal (USR2, `signal_delay_s` before the time limit, or on preemption) by calling
`checkpoint()` and requeueing at once, from inside the signal handler. That is too early for a data-parallel run:
every rank must first finish its step and write its part of the checkpoint. So the trainer's own handler takes the
signal and only sets a flag; the loop checkpoints at the next update boundary on every rank, and then rank 0 hands
the signal to submitit's handler, which counts timeouts against `max_requeues`, resubmits this same object (its state
is the run directory, nothing else) and requeues the job. The next attempt resumes from the newest COMPLETE checkpoint.

SIGTERM (scancel, or the end of a preemption's grace time) checkpoints and stops without requeueing.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit

from cluster import attempts
from trainer.config import ExperimentConfig


class TrainingJob(submitit.helpers.Checkpointable):
    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        workdir: str,
        gpus_per_node: int,
        executor: str = "slurm",
        allow_config_change: bool = False,
        allow_batch_change: bool = False,
    ) -> None:
        self.cfg = cfg
        self.executor = executor  # "slurm" or "local": how the run directory's lease tells whether the job lives
        self.workdir = workdir  # relative paths in the config (run_dir, shards) mean what they meant at launch
        self.gpus_per_node = gpus_per_node  # > 0: a rank that cannot use a GPU refuses to train on the CPU
        self.allow_config_change = allow_config_change
        self.allow_batch_change = allow_batch_change

    def __call__(self) -> dict[str, Any]:
        from trainer.stop import StopFlag

        requeue_signal = submitit_requeue_signal()
        submitit_requeue = signal.getsignal(requeue_signal)
        stop = StopFlag()
        stop.install()  # first thing: from here on, a signal only asks the loop to checkpoint and stop
        if self.gpus_per_node == 0:  # a CPU job: GPUs the node does not hide from it belong to others
            os.environ["CUDA_VISIBLE_DEVICES"] = ""

        import torch.distributed as dist  # the heavy imports come after: they take seconds

        from cluster.environment import from_submitit, init_distributed
        from cluster.lease import Lease
        from trainer.collectives import reduce_scalar
        from trainer.layout import latest_complete
        from trainer.train import train

        os.chdir(self.workdir)
        environment = from_submitit()
        init_distributed(environment, job_gpus=self.gpus_per_node, timeout_s=self.cfg.train.collective_timeout_s)
        run_dir = Path(self.cfg.train.run_dir)
        attempt = _AttemptLog(run_dir, enabled=environment.rank == 0)
        attempt.started(_step(latest_complete(run_dir)), world_size=environment.world_size)
        # Held by rank 0 from the start of training; kept across a requeue, which the next attempt takes over.
        lease = Lease("train", job_id=attempt.job_id, executor=self.executor, restart=attempt.restart)

        try:
            summary = train(
                self.cfg,
                allow_config_change=self.allow_config_change,
                allow_batch_change=self.allow_batch_change,
                stop=stop,
                owner=lease,
            )
        except BaseException as error:
            attempt.ended(_step(latest_complete(run_dir)), _why_it_ended(error))
            lease.release()
            raise

        stop.uninstall()  # a late signal must not kill a process that is about to requeue or return
        # Rank 0 requeues if any rank was asked to, unless the run is finished: a warning that came after the last
        # update's stop check has nothing left to continue.
        finished = summary.end_step >= self.cfg.optim.max_updates  # the same on every rank
        requeue = not finished and reduce_scalar(float(requeue_signal in stop.signals)) > 0
        if requeue:
            attempt.ended(summary.end_step, f"requeue ({requeue_signal.name})")
        else:
            attempt.ended(summary.end_step, f"stopped ({stop.reason})" if summary.stopped_by else "done")
            lease.release()
        if requeue and callable(submitit_requeue):
            dist.destroy_process_group()
            submitit_requeue(requeue_signal, None)  # rank 0: resubmit + requeue, then exit; other ranks return
        return asdict(summary) | {"run_dir": str(summary.run_dir)}


def submitit_requeue_signal() -> signal.Signals:
    """The signal whose handler submitit installs to checkpoint and requeue the job (USR2 unless configured)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG.removeprefix("SIG")]


class _AttemptLog:
    """This attempt's lines in the run directory's attempts.jsonl (written by rank 0 only)."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        job = submitit.JobEnvironment()
        self.run_dir = run_dir
        self.enabled = enabled
        self.job_id = job.job_id
        previous = [e for e in attempts.read_events(run_dir) if e["event"] == "started" and e["job_id"] == job.job_id]
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", len(previous)))
        self.hosts = list(job.hostnames)

    def started(self, step: int, *, world_size: int) -> None:
        if self.enabled:
            attempts.record(
                self.run_dir,
                "started",
                job_id=self.job_id,
                restart=self.restart,
                step=step,
                world_size=world_size,
                hosts=self.hosts,
                host=socket.gethostname(),
                pid=os.getpid(),
            )

    def ended(self, step: int, reason: str) -> None:
        if self.enabled:
            attempts.record(self.run_dir, "ended", job_id=self.job_id, restart=self.restart, step=step, reason=reason)


def _why_it_ended(error: BaseException) -> str:
    from trainer.train import TrainingAbortedError

    if isinstance(error, TrainingAbortedError):
        return f"aborted: {error}"
    if isinstance(error, ValueError):
        return f"refused: {error}"  # before training: the run directory is another run's, or not this user's
    return f"failed: {type(error).__name__}: {error}"


def _step(latest: tuple[int, Path] | None) -> int:
    return latest[0] if latest else 0
