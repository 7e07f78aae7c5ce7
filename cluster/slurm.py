"""Running SLURM's client commands (sbatch, squeue, scontrol, sacct, scancel) as subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?(\.[0-9a-z]+)?$")


class SlurmError(RuntimeError):
    """A SLURM command failed or SLURM is not installed."""


def check_job_id(job_id: str) -> str:
    """A job id as SLURM prints it (``123``, ``123_4``, ``123.0``); anything else is refused."""
    job_id = str(job_id).strip()
    if not JOB_ID.match(job_id):
        raise SlurmError(f"not a SLURM job id: {job_id!r}")
    return job_id


def slurm(*args: str, timeout: float = 60, check: bool = True, stdin: str | None = None) -> str:
    """Run a SLURM client command (argument list, no shell); returns stdout."""
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found: is SLURM installed here (see cluster.local_slurm)?")
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, input=stdin, env=os.environ.copy()
    )
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
