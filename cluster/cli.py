"""``pretrain`` subcommands for clusters and operators.

    pretrain submit CONFIG [--nodes N --gpus-per-node G --ntasks-per-node T --time HH:MM:SS
                            --partition P --account A --job-name NAME --set K=V ... --dry-run]
    pretrain status [JOB]          pretrain logs JOB [-f]          pretrain cancel JOB
    pretrain mlflow serve [--backend-store-uri URI --artifacts-destination DIR --host H --port P]
    pretrain monitor [--tracking-uri URI --experiment NAME --stall-seconds S]

:func:`add_cluster_commands` registers them on the ``pretrain`` parser; each parser gets a
``handler`` default that returns the exit code (SLURM failures: 1, with the reason on stderr).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.slurm import SlurmError
from pretrain.config import add_overrides_argument

Handler = Callable[[argparse.Namespace], int]


def _guard(fn: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (SlurmError, TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    run.__name__ = fn.__name__
    return run


def _cmd_submit(args: argparse.Namespace) -> int:
    from cluster.sbatch_script import SubmitOptions
    from cluster.submit import submit

    options = SubmitOptions(
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        overrides=args.overrides,
        signal_grace=args.signal_grace,
        max_restarts=args.max_restarts,
        requeue=not args.no_requeue,
    )
    result = submit(args.config, options, dry_run=args.dry_run)
    if args.dry_run:
        print(result.script, end="")
        return 0
    print(result.job_id)
    print(f"script: {result.script_path}\noutput: {result.output_path}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster.jobs import job_status, list_jobs

    jobs = [job_status(args.job)] if args.job else list_jobs()
    print(f"{'JOB':>8}  {'STATE':<11} {'NAME':<20} {'NODES':<12} {'TIME':>10} RESTARTS  EXIT/REASON")
    for j in jobs:
        extra = j.exit_code if j.finished else j.reason
        print(
            f"{j.job_id:>8}  {j.state:<11} {j.name[:20]:<20} {j.nodes[:12]:<12} {j.elapsed:>10} {j.restarts:>8}  {extra}"
        )
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from cluster.jobs import follow, job_status, output_path

    path = output_path(args.job)
    if not args.follow:
        if not path.is_file():
            raise SlurmError(f"job {args.job} has no output yet ({path})")
        sys.stdout.write(path.read_text())
        return 0
    for chunk in follow(path, stop=lambda: job_status(args.job).finished):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from cluster.jobs import cancel

    cancel(args.job, signal_name=args.signal, batch_only=args.signal is not None)
    print(f"{'signalled' if args.signal else 'cancelled'} job {args.job}", file=sys.stderr)
    return 0


def _cmd_mlflow_serve(args: argparse.Namespace) -> int:
    from cluster.mlflow_server import serve

    proc = serve(
        args.backend_store_uri,
        args.artifacts_destination,
        host=args.host,
        port=args.port,
        workers=args.workers,
        basic_auth=args.basic_auth,
        auth_database_uri=args.auth_database_uri,
        wait=False,
    )
    print(
        f"mlflow server on http://{args.host}:{args.port} (pid {proc.pid}); Ctrl-C stops it", file=sys.stderr
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    from cluster.monitor import monitor

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SlurmError("give --tracking-uri or set MLFLOW_TRACKING_URI")
    flagged = monitor(uri, args.experiment, args.stall_seconds, spike_factor=args.spike_factor)
    for run_id, reason in flagged:
        print(f"{run_id}  {reason}")
    if not flagged:
        print("all runs healthy", file=sys.stderr)
    return 3 if flagged else 0


def add_cluster_commands(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Register the cluster subcommands; returns ``{command: handler}`` (also set as ``handler``)."""
    handlers: dict[str, Handler] = {}

    def parser(name: str, fn: Handler, **kw: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kw)
        handlers[name] = _guard(fn)
        p.set_defaults(handler=handlers[name])
        return p

    p = parser(
        "submit",
        _cmd_submit,
        help="submit a training run to SLURM (sbatch)",
        description="Render the run's batch script (stored in <run_dir>/sbatch/), submit it and "
        "print the job id. The job requeues itself on its time-limit warning or on preemption "
        "and resumes from the checkpoint it saved.",
    )
    p.add_argument("config", type=Path, help="run config YAML")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--ntasks-per-node", type=int, default=1, help="ranks per node")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--time", default=None, help="time limit [D-]HH:MM:SS")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None, help="default: the config's name")
    p.add_argument("--signal-grace", type=int, default=120, help="seconds of warning before the time limit")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts without progress allowed")
    p.add_argument("--no-requeue", action="store_true", help="never requeue the job")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    add_overrides_argument(p, help="config override passed to every rank (repeatable)")

    p = parser("status", _cmd_status, help="state of one job, or the queue", description="Job status.")
    p.add_argument("job", nargs="?", help="job id (default: every queued job)")

    p = parser("logs", _cmd_logs, help="print a job's output", description="Print a job's output file.")
    p.add_argument("job", help="job id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")

    p = parser("cancel", _cmd_cancel, help="cancel a job", description="Cancel (or signal) a job.")
    p.add_argument("job", help="job id")
    p.add_argument("--signal", default=None, help="only send this signal to the batch shell, e.g. USR1")

    p = sub.add_parser("mlflow", help="operators' MLflow tracking server", description="MLflow tools.")
    mlflow_sub = p.add_subparsers(dest="mlflow_command", required=True, metavar="COMMAND")
    sp = mlflow_sub.add_parser(
        "serve",
        help="run a tracking server (sqlite or any SQLAlchemy store)",
        description="Run an MLflow tracking server with 1 worker, bound to 127.0.0.1 by default.",
    )
    handlers["mlflow"] = _guard(_cmd_mlflow_serve)
    sp.set_defaults(handler=handlers["mlflow"])
    p.set_defaults(handler=handlers["mlflow"])
    sp.add_argument("--backend-store-uri", default="sqlite:///mlflow.db", help="any SQLAlchemy URI")
    sp.add_argument("--artifacts-destination", default="mlartifacts")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=5000)
    sp.add_argument("--workers", type=int, default=1)
    sp.add_argument("--basic-auth", action="store_true", help="require logins ($MLFLOW_AUTH_ADMIN_PASSWORD)")
    sp.add_argument("--auth-database-uri", default=None, help="user store (default: beside a sqlite store)")

    p = parser(
        "monitor",
        _cmd_monitor,
        help="flag stalled, non-finite and spiking runs",
        description="Check an experiment's runs, tag those needing attention (health=...) and list "
        "them; exits 3 when any needs attention.",
    )
    p.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="pretrain")
    p.add_argument("--stall-seconds", type=float, default=1800)
    p.add_argument("--spike-factor", type=float, default=3.0)
    return handlers
