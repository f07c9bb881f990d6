"""The `music2vec` command line: one entry point, one subcommand per way of using the system.

Each command is a short function that imports the package doing the work when it runs (data, trainer, cluster or
probes): the command line reaches every package, and starting one command loads only what that command needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

ARRAY_TASK_JOBS = 8  # an array task's CPUs unless --jobs says: the login node's core count says nothing of the nodes


def _demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    run_demo(Path(args.out), clips=args.clips, steps=args.steps, seed=args.seed, probes=not args.no_probes)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from data.shard_parts import merge_parts
    from data.shards import ShardParams, WorkerDiedError, write_shards

    if args.merge:
        if args.sources or args.out or args.executor:
            raise ValueError("--merge DIR joins the parts already written in DIR: give no SRC, --out or --executor")
        _print_shard_set(merge_parts(Path(args.merge)), args.merge)
        return 0
    if not args.sources or not args.out:
        raise ValueError("give the audio to shard (SRC ...) and --out DIR, or --merge DIR")
    params = ShardParams(
        clip_seconds=args.clip_seconds,
        min_seconds=args.min_seconds,
        max_count=args.shard_max_count,
        max_bytes=int(args.shard_max_bytes),
    )
    if args.executor:
        return _submit_shards(args, params)
    if args.array:
        raise ValueError("--array needs --executor slurm (a SLURM job array) or --executor local")
    try:
        manifest = write_shards(args.sources, args.out, params, jobs=args.jobs or os.cpu_count() or 1)
    except WorkerDiedError as error:
        print(f"music2vec shard: stopped: {error}", file=sys.stderr)
        return 1
    _print_shard_set(manifest, args.out)
    return 0


def _print_shard_set(manifest: dict[str, Any], out: str) -> None:
    hours = manifest["total_seconds"] / 3600
    print(
        f"{manifest['total_samples']} clips ({hours:.2f} h) in {len(manifest['shards'])} shards under {out};"
        f" {manifest['rejected']} inputs rejected (see {out}/rejected.jsonl)"
    )


def _submit_shards(args: argparse.Namespace, params: Any) -> int:
    from cluster.config import ClusterConfig
    from cluster.shard_job import ShardArray, submit
    from data.shard_parts import merge_parts

    out = Path(args.out).resolve()
    cluster = ClusterConfig(
        executor=args.executor,
        gpus_per_node=0,
        tasks_per_node=1,
        cpus_per_task=args.jobs or ARRAY_TASK_JOBS,
        time=args.time or "12:00:00",
        max_requeues=args.max_requeues,
        **{name: getattr(args, name) or "" for name in ("partition", "account", "qos", "constraint", "mem")},
        job_name="music2vec-shard",
    )
    sources = tuple(str(Path(source).absolute()) for source in args.sources)  # globs too: a task may start elsewhere
    array = ShardArray(sources=sources, out=out, params=params, parts=args.array or 1, cluster=cluster)
    jobs = submit(array)
    if not jobs:
        print(f"every part of {out} is finished already; merged")
        _print_shard_set(merge_parts(out), str(out))
        return 0
    array_id = jobs[0].job_id.split("_")[0]  # SLURM names a task <array id>_<task>; a local one has a pid
    print(
        f"submitted {args.executor} job array {array_id}: {len(jobs)} of {array.parts} parts into {out};"
        f" logs in {jobs[0].paths.folder.parent}",
        flush=True,
    )
    if args.executor == "local" or args.wait:
        return _wait_for_parts(jobs, out)
    return 0


def _wait_for_parts(jobs: list[Any], out: Path) -> int:
    """Until every task is done; the merged set, or the tasks that failed (the others' parts are kept)."""
    from data.shard_parts import merge_parts

    failed = [failure for job in jobs if (failure := _task_failure(job))]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        print("run the same command again to finish the parts that failed", file=sys.stderr)
        return 1
    _print_shard_set(merge_parts(out), str(out))  # the last task merged already; this is the same, and says so
    return 0


def _train(args: argparse.Namespace) -> int:
    from cluster.config import load_job_config
    from cluster.environment import from_environment, init_distributed
    from cluster.lease import Lease
    from trainer.train import TrainingAbortedError, check_runnable, train

    cfg, _ = load_job_config(args.config, args.overrides)  # fails here, before any process group starts
    check_runnable(cfg)
    init_distributed(from_environment(), timeout_s=cfg.train.collective_timeout_s)
    job_id = os.environ.get("SLURM_JOB_ID")  # under srun in a batch script of the user's own
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0")) if job_id else None  # set from the first requeue on
    lease = Lease(
        "train", job_id=job_id, executor="slurm" if job_id else None, restart=restart, take_over=args.take_over
    )
    try:
        summary = train(
            cfg, allow_config_change=args.allow_config_change, allow_batch_change=args.allow_batch_change, owner=lease
        )
    except TrainingAbortedError as error:
        print(f"music2vec train: aborted: {error}", file=sys.stderr)
        return 1
    finally:
        lease.release()
    if int(os.environ.get("RANK", "0")) == 0:
        ended = f"stopped by {summary.stopped_by}" if summary.stopped_by else "done"
        print(
            f"{ended} on {summary.device}: updates {summary.start_step} -> {summary.end_step},"
            f" loss {summary.first_loss} -> {summary.last_loss}, {summary.audio_seconds_per_s:.0f} audio-s/s;"
            f" run directory {summary.run_dir}"
        )
    return 0


def _launch(args: argparse.Namespace) -> int:
    from cluster.config import load_job_config, with_flags
    from cluster.launch import describe, plan_launch, submit

    experiment, cluster = load_job_config(args.config, args.overrides)
    cluster = with_flags(cluster, vars(args))
    allowed = {"allow_config_change": args.allow_config_change, "allow_batch_change": args.allow_batch_change}
    plan = plan_launch(experiment, cluster, take_over=args.take_over, **allowed)
    if args.dry_run:
        print(describe(plan) + "\ndry run: nothing submitted")
        return 0
    job = submit(plan, take_over=args.take_over, **allowed)
    print(
        f"submitted {cluster.executor} job {job.job_id}: {cluster.world_size} rank(s) training into {plan.run_dir};"
        f" logs in {job.paths.folder}; watch it with: music2vec status {plan.run_dir}",
        flush=True,
    )
    if cluster.executor == "local" or args.wait:
        return _wait(job)
    return 0


def _wait(job: Any) -> int:
    """Until the job is finished (through its requeues); its ranks' summaries or its error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        summary = job.results()[0]
    except (FailedJobError, UncompletedJobError) as error:
        print(
            f"job {job.job_id} did not finish: {_last_error_line(str(error))}; logs in {job.paths.folder}",
            file=sys.stderr,
        )
        return 1
    ended = f"stopped by {summary['stopped_by']}" if summary["stopped_by"] else "done"
    print(f"job {job.job_id} {ended} on {summary['device']}: updates {summary['start_step']} -> {summary['end_step']}")
    return 0


def _task_failure(job: Any) -> str | None:
    """None once `job` has finished well; else what went wrong and where its log is."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        job.result()
    except (FailedJobError, UncompletedJobError) as error:
        return f"task {job.job_id}: {_last_error_line(str(error))}; log {job.paths.stdout}"
    return None


def _last_error_line(report: str) -> str:
    """The exception line of the traceback submitit reports (it is followed by dashes and the log paths)."""
    traceback = report.split("You can check full logs", maxsplit=1)[0]
    lines = [line.strip() for line in traceback.splitlines() if line.strip().strip("-")]
    return lines[-1] if lines else report.strip()


def _probe(args: argparse.Namespace) -> int:
    from data import jsonlines
    from probes.probe import probe, summary_table

    settings = _probe_settings(args)
    rows = probe(Path(args.checkpoint), _probe_tasks(args, settings), settings)
    print(summary_table(rows), end="")
    if args.out:
        jsonlines.append(Path(args.out), rows)
    return 0


def _nightly(args: argparse.Namespace) -> int:
    from cluster.nightly import EVERY_NEEDS_SLURM
    from probes.nightly import nightly_runs

    if args.executor:
        return _submit_nightly(args)
    if args.every:
        raise ValueError(EVERY_NEEDS_SLURM)
    run_dirs = [Path(run_dir) for run_dir in args.run_dirs]
    settings = _probe_settings(args)
    outcomes = nightly_runs(run_dirs, _probe_tasks(args, settings), settings)
    return _report_nightly(outcomes)


def _report_nightly(outcomes: dict[Path, int | str]) -> int:
    """A line per run that got probed (a skipped or failed one was said on stderr as it happened)."""
    from trainer.layout import PROBE_REPORT

    for run_dir, outcome in outcomes.items():
        if isinstance(outcome, int):
            print(f"{run_dir}: {outcome} new result rows; report {run_dir / PROBE_REPORT}")
    return _nightly_status(outcomes)


def _nightly_status(outcomes: dict[Any, int | str]) -> int:
    """1 when a run failed (the others were probed all the same), else 0."""
    failed = [str(run_dir) for run_dir, outcome in outcomes.items() if str(outcome).startswith("failed")]
    if failed:
        print(f"music2vec nightly: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _submit_nightly(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfig
    from cluster.nightly import NightlySchedule, check_schedule, interval_seconds, submit

    settings = _probe_settings(args)
    cluster = ClusterConfig(
        executor=args.executor,
        gpus_per_node=args.gpus,
        tasks_per_node=1,
        cpus_per_task=args.cpus_per_task,
        time=args.time or "6:00:00",
        **{name: getattr(args, name) or "" for name in ("partition", "account", "qos", "constraint", "mem")},
        job_name="music2vec-nightly",
    )
    schedule = NightlySchedule(
        run_dirs=tuple(Path(run_dir).resolve() for run_dir in args.run_dirs),
        tasks=tuple(_probe_tasks(args, settings)),
        settings=replace(
            settings,
            data_root=settings.data_root.resolve(),
            cache=settings.cache.resolve() if settings.cache else None,
            progress=False,
        ),
        cluster=cluster,
        every_s=interval_seconds(args.every) if args.every else None,
    )
    check_schedule(schedule)
    job = submit(schedule)
    every = f", then every {args.every}" if args.every else ""
    print(f"submitted {args.executor} nightly probe job {job.job_id}{every}; logs in {job.paths.folder}", flush=True)
    if args.executor == "local" or args.wait:
        result = job.result()
        following = f"; the next one is job {result['next_job']}" if result["next_job"] else ""
        print(f"job {job.job_id} done: new result rows {result['new_rows']}{following}")
        return _nightly_status(result["new_rows"])
    return 0


def _probe_settings(args: argparse.Namespace) -> Any:
    from probes.head import HeadConfig
    from probes.probe import ProbeSettings

    head = HeadConfig(lr=getattr(args, "lr", None), standardize=args.standardize)
    return ProbeSettings(
        data_root=Path(args.data_root),
        seeds=tuple(args.seeds),
        cache=Path(args.cache_dir) if args.cache_dir else None,
        head=replace(head, hidden=0) if getattr(args, "linear", False) else head,
        search=getattr(args, "search", None),
        layers=_layers(getattr(args, "layers", None)),
        precision=args.precision,
        progress=sys.stderr.isatty(),  # a bar on a terminal; nothing in a job's log
        task_files=tuple(Path(path).resolve() for path in args.task_file or ()),
        random_init=getattr(args, "random_init", False),
        protocol=args.protocol,
    )


def _probe_tasks(args: argparse.Namespace, settings: Any) -> list[str]:
    """--tasks, then the tasks of the --task-file files, which are read and checked whole here: a mistake in one
    stops the command before any job is queued or feature extracted."""
    from probes.probe import known_tasks, task_names

    builtin, given = set(task_names()), list(args.tasks or [])
    from_files = [name for name in known_tasks(settings.task_files) if name not in builtin]
    tasks = given + [name for name in from_files if name not in given]
    if not tasks:
        raise ValueError("nothing to probe: give --tasks (built-in tasks) or --task-file (a task of your own)")
    return tasks


def _layers(given: list[str] | None) -> tuple[int, ...] | Literal["all"] | None:
    if given is None:
        return None
    if given == ["all"]:
        return "all"
    if not all(layer.isdigit() for layer in given):
        raise ValueError(f"--layers {' '.join(given)}: expected hidden-state indices (0, 1, ...) or 'all'")
    return tuple(int(layer) for layer in given)


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export

    folder = export(Path(args.checkpoint), Path(args.out), weights=args.weights)
    print(
        f"exported the {args.weights} of {folder} in fp32 to {args.out};"
        f" load it with transformers' Data2VecAudioModel.from_pretrained({str(args.out)!r})"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster.status import status_table

    print(status_table([Path(run_dir) for run_dir in args.run_dirs]), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="music2vec",
        description="Pretrain Music2Vec (data2vec-audio on music) with DeepSpeed and probe every checkpoint.",
    )
    # The deepspeed launcher passes --local_rank to every process (LOCAL_RANK in the environment says the same).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_shard(commands)
    _add_train(commands)
    _add_launch(commands)
    _add_probe(commands)
    _add_nightly(commands)
    _add_export(commands)
    _add_status(commands)
    return parser


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="the embedded default job: rendered compositions -> shards -> the tiny model trained -> probes"
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the corpus, shards and run (default: %(default)s)"
    )
    demo.add_argument("--clips", type=int, default=48, help="30 s excerpts of demo music (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=800, help="optimizer updates (default: %(default)s)")
    demo.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the pretraining's seed: initialisation, crops, masks (default: %(default)s)",
    )
    demo.add_argument("--no-probes", action="store_true", help="stop after training: no demo-task probes")
    demo.set_defaults(run=_demo)


def _add_shard(commands: Any) -> None:
    shard = commands.add_parser(
        "shard",
        help="raw audio (files, folders, globs, list files) -> 16 kHz FLAC clips in WebDataset shards + manifest",
    )
    shard.add_argument("sources", nargs="*", metavar="SRC", help="audio files, folders, globs, or .txt path lists")
    shard.add_argument("--out", help="output folder (resumes an interrupted run into it)")
    shard.add_argument("--clip-seconds", type=float, default=30.0, help="clip length (default: %(default)s)")
    shard.add_argument(
        "--min-seconds", type=float, default=5.0, help="drop a shorter tail or file (default: %(default)s)"
    )
    shard.add_argument("--shard-max-count", type=int, default=1000, help="clips per shard (default: %(default)s)")
    shard.add_argument("--shard-max-bytes", type=float, default=1e9, help="bytes per shard (default: %(default)g)")
    shard.add_argument(
        "--jobs",
        type=int,
        help=f"decoding processes (default: all cores; in an array, each task's CPUs, default {ARRAY_TASK_JOBS})",
    )
    shard.add_argument(
        "--executor",
        choices=("slurm", "local"),
        help="shard as a job array: SLURM through submitit, or local processes",
    )
    shard.add_argument(
        "--array", type=int, metavar="N", help="with --executor: split the inputs into N parts, a task each"
    )
    _add_slurm_resources(
        shard, time_help="time limit of one task's attempt; a task requeues itself (default: 12:00:00)"
    )
    shard.add_argument("--max-requeues", type=int, default=20, help="requeues of a task (default: %(default)s)")
    shard.add_argument("--wait", action="store_true", help="wait for a SLURM array to finish (local tasks always do)")
    shard.add_argument("--merge", metavar="DIR", help="join the finished parts in DIR into one manifest, and stop")
    shard.set_defaults(run=_shard)


def _add_experiment_arguments(parser: argparse.ArgumentParser, config_help: str, *, example: str) -> None:
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {example}")
    parser.add_argument(
        "--allow-config-change", action="store_true", help="continue a run directory whose config was different"
    )
    parser.add_argument(
        "--allow-batch-change",
        action="store_true",
        help="resume on a world size where no train.grad_accum keeps the checkpoint's crops per update: go on with"
        " the nearest global batch",
    )
    parser.add_argument(
        "--take-over",
        action="store_true",
        help="take the run directory over from a run whose end cannot be confirmed (its scheduler does not answer,"
        " or it ran on another host); make sure it has ended",
    )


def _add_train(commands: Any) -> None:
    train = commands.add_parser(
        "train", help="train on this machine: one process, or every rank under torchrun / the deepspeed launcher"
    )
    _add_experiment_arguments(train, "experiment YAML (configs/...)", example="optim.lr=3e-4")
    train.set_defaults(run=_train)


def _add_launch(commands: Any) -> None:
    launch = commands.add_parser(
        "launch", help="submit training as a job: SLURM through submitit (requeues itself), or local processes"
    )
    config_help = "experiment YAML; its cluster: section holds the defaults of the flags below"
    _add_experiment_arguments(launch, config_help, example="cluster.nodes=2")
    launch.add_argument("--executor", choices=("slurm", "local"), help="where the job runs (default: slurm)")
    launch.add_argument("--nodes", type=int, help="nodes (default: 1)")
    launch.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each (default: 8)")
    launch.add_argument("--tasks-per-node", type=int, help="tasks per node of a CPU-only job (--gpus-per-node 0)")
    launch.add_argument("--cpus-per-task", type=int, help="CPUs per task; they size data.workers=-1 (default: 10)")
    time_help = "time limit of one attempt, e.g. 3-00:00:00; longer runs requeue themselves"
    _add_slurm_resources(launch, time_help=time_help)
    launch.add_argument("--max-requeues", type=int, help="requeues after a time limit before giving up (default: 20)")
    launch.add_argument(
        "--dry-run", action="store_true", help="check and print the resolved config and job; submit nothing"
    )
    launch.add_argument("--wait", action="store_true", help="wait for a SLURM job to finish (local jobs always do)")
    launch.set_defaults(run=_launch)


def _add_slurm_resources(parser: argparse.ArgumentParser, *, time_help: str) -> None:
    """What `launch` and `nightly` ask SLURM for beyond tasks and GPUs."""
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", help=time_help)
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--constraint", help="SLURM node features, e.g. a100")
    parser.add_argument("--mem", help="memory per node, e.g. 480G")


def _add_probe_settings(parser: argparse.ArgumentParser) -> None:
    """What `probe` and `nightly` share: tasks, datasets, seeds, the feature cache, feature scaling."""
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="built-in tasks, e.g. demo_key demo_tempo")
    parser.add_argument(
        "--task-file",
        nargs="+",
        action="extend",
        metavar="YAML",
        help="a task of your own: a YAML naming its kind, labels, metric and a CSV/JSONL of examples (PROBES.md)",
    )
    parser.add_argument("--data-root", default="data/probes", help="where the datasets live (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one head per seed (default: 0)")
    parser.add_argument("--cache-dir", help="feature cache (default: ~/.cache/music2vec/features)")
    parser.add_argument("--standardize", action="store_true", help="scale features with the train split (JukeMIR)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the encoder's precision when extracting features; bf16 is faster on GPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        metavar="N",
        help="a probe per hidden state, 0 being the transformer's input: indices, or 'all' for a layer-wise curve"
        " (default: learned weights over 1..L)",
    )
    parser.add_argument(
        "--protocol",
        choices=("marble", "jukemir"),
        default="marble",
        help="MARBLE's probe (30 s windows, the epoch loop) or JukeMIR's: one feature vector per clip of the layer"
        " --layers names, its 216-head grid, random batches, validation every 8 steps (default: %(default)s)",
    )
    parser.add_argument(
        "--search",
        choices=("lr", "jukemir"),
        help="train several heads and report the best on validation: MARBLE's learning rates 1e-2 ... 1e-4, or"
        " JukeMIR's 216-head grid",
    )


def _add_probe(commands: Any) -> None:
    probe = commands.add_parser("probe", help="probe one checkpoint on MIR tasks with frozen features")
    probe.add_argument(
        "checkpoint",
        help="an export folder, a run's checkpoints/step_N, or any Hugging Face Data2VecAudioModel folder",
    )
    _add_probe_settings(probe)
    probe.add_argument("--lr", type=float, help="the head's learning rate (default: the task's)")
    probe.add_argument("--linear", action="store_true", help="a linear head instead of the 512-unit MLP")
    probe.add_argument("--out", help="append the result rows to this JSON-lines file")
    probe.set_defaults(run=_probe)


def _add_nightly(commands: Any) -> None:
    nightly = commands.add_parser(
        "nightly", help="probe every COMPLETE checkpoint not probed yet; results, TensorBoard scalars, report"
    )
    nightly.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.run_dir)")
    _add_probe_settings(nightly)
    nightly.add_argument(
        "--executor", choices=("slurm", "local"), help="run as a job: SLURM through submitit, or a local process"
    )
    nightly.add_argument("--every", help="with --executor slurm: resubmit every interval, e.g. 24h (SLURM --begin)")
    nightly.add_argument(
        "--gpus", type=int, choices=(0, 1), default=1, help="GPUs of the job; it uses one (default: %(default)s)"
    )
    nightly.add_argument("--cpus-per-task", type=int, default=8, help="CPUs of the job (default: %(default)s)")
    _add_slurm_resources(nightly, time_help="time limit of one night's job (default: 6:00:00)")
    nightly.add_argument("--wait", action="store_true", help="wait for a SLURM job to finish (local jobs always do)")
    nightly.add_argument(
        "--random-init",
        action="store_true",
        help="also probe the run's model before its first update (step 0), once: the report's reference line",
    )
    nightly.set_defaults(run=_nightly)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a complete checkpoint's weights in fp32, as a Hugging Face Data2VecAudioModel folder"
    )
    export.add_argument(
        "checkpoint", help="a run's checkpoints/step_N, or a run directory (its newest complete checkpoint)"
    )
    export.add_argument("--out", required=True, help="the folder to write; it must not exist yet")
    export.add_argument(
        "--weights",
        choices=("student", "teacher"),
        default="student",
        help="the trained student, or the EMA teacher that it regressed on (default: %(default)s)",
    )
    export.set_defaults(run=_export)


def _add_status(commands: Any) -> None:
    status = commands.add_parser("status", help="one table across runs: job state, step, loss, throughput, ETA")
    status.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (train.run_dir)")
    status.set_defaults(run=_status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow the flags: `launch CONFIG --nodes 2 optim.lr=1e-4`
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from cluster.environment import GPUUnavailableError
    from cluster.submit import SchedulerRefusedError

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, GPUUnavailableError) as error:
        # Bad input or a node that cannot do what was asked: the message names the file, key, value or driver; a
        # traceback would only bury it.
        parser.exit(2, f"music2vec {args.command}: error: {error}\n")
    except SchedulerRefusedError as error:
        parser.exit(1, f"music2vec {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
