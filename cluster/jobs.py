"""Job status, logs and cancellation through SLURM's own commands.

Running and pending jobs come from ``squeue``/``scontrol``; finished ones from ``sacct`` (with
``-c``, the completion log, on clusters without an accounting database).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.slurm import SlurmError, check_job_id, slurm


@dataclass
class JobInfo:
    job_id: str
    name: str
    state: str
    """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED..."""
    nodes: str = ""
    elapsed: str = ""
    exit_code: str = ""
    restarts: int = 0
    reason: str = ""
    output: str = ""
    """The job's output file (stdout and stderr)."""

    @property
    def finished(self) -> bool:
        return self.state not in {
            "PENDING",
            "RUNNING",
            "REQUEUED",
            "CONFIGURING",
            "COMPLETING",
            "SUSPENDED",
            "REQUEUE_HOLD",
            "REQUEUE_FED",
            "RESIZING",
            "STOPPED",
        }


def _scontrol_job(job_id: str) -> JobInfo | None:
    out = slurm("scontrol", "show", "job", "-o", job_id, check=False)
    if not out.strip() or "Invalid job id" in out:
        return None
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    return JobInfo(
        job_id=fields.get("JobId", job_id),
        name=fields.get("JobName", ""),
        state=fields.get("JobState", "UNKNOWN"),
        nodes=fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "",
        elapsed=fields.get("RunTime", ""),
        exit_code=fields.get("ExitCode", ""),
        restarts=int(fields.get("Restarts", "0") or 0),
        reason=fields.get("Reason", ""),
        output=fields.get("StdOut", ""),
    )


def _sacct_job(job_id: str, completion_log: bool) -> JobInfo | None:
    args = ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,JobName,State,NodeList,Elapsed,ExitCode"]
    if completion_log:
        args.insert(1, "-c")
    out = slurm(*args, check=False)
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    rows = [r for r in rows if r[0] == job_id]
    if not rows:
        return None
    jid, name, state, nodes, elapsed, exit_code = (rows[-1] + [""] * 6)[:6]
    return JobInfo(jid, name, state.split()[0], nodes, elapsed, exit_code)


def job_status(job_id: str) -> JobInfo:
    """The job's state from the controller, else from accounting or the completion log."""
    job_id = check_job_id(job_id)
    info = _scontrol_job(job_id) or _sacct_job(job_id, False) or _sacct_job(job_id, True)
    if info is None:
        raise SlurmError(f"job {job_id} is unknown to squeue, scontrol and sacct")
    return info


def list_jobs(user: str | None = None) -> list[JobInfo]:
    """Pending and running jobs (``squeue``), optionally of one user."""
    args = ["squeue", "-h", "-o", "%i|%j|%T|%N|%M|%r"] + (["-u", user] if user else [])
    jobs = []
    for line in slurm(*args).splitlines():
        parts = (line.split("|") + [""] * 6)[:6]
        jobs.append(JobInfo(parts[0], parts[1], parts[2], parts[3], parts[4], reason=parts[5]))
    return jobs


def cancel(job_id: str, *, signal_name: str | None = None, batch_only: bool = False) -> None:
    """``scancel`` the job, or just send it ``signal_name`` (e.g. ``USR1``)."""
    job_id = check_job_id(job_id)
    args = ["scancel"]
    if signal_name:
        if not re.match(r"^[A-Z0-9]{2,8}$", signal_name):
            raise SlurmError(f"not a signal name: {signal_name!r}")
        args.append(f"--signal={signal_name}")
    if batch_only:
        args.append("--batch")
    slurm(*args, job_id)


def output_path(job_id: str) -> Path:
    """The job's output file, as the controller reports it."""
    info = job_status(job_id)
    if not info.output:
        raise SlurmError(f"job {job_id}: its output path is no longer known to the controller")
    return Path(info.output)


def follow(
    path: Path, *, stop: Callable[[], bool] | None = None, poll: float = 0.5, timeout: float | None = None
) -> Iterator[str]:
    """Yield the file's text as it grows (``tail -f``) until ``stop()`` is true and it is drained."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pos = 0
    while True:
        done = stop() if stop else False
        if path.is_file():
            with path.open() as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                yield chunk
                continue
        if done or (deadline is not None and time.monotonic() > deadline):
            return
        time.sleep(poll)


def wait_for(job_id: str, states: set[str], *, timeout: float, poll: float = 1.0) -> JobInfo:
    """Poll until the job reaches one of ``states`` (raises ``TimeoutError`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_status(job_id)
        if info.state in states:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.state} after {timeout:.0f} s (wanted {states})")
        time.sleep(poll)
