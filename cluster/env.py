"""Where this process sits in a job: rank and world size from torchrun or SLURM variables."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessEnv:
    """Rank coordinates of this process; a plain ``python`` run is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    slurm_job_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> ProcessEnv:
        """torchrun's RANK/LOCAL_RANK/WORLD_SIZE win; else SLURM's SLURM_PROCID/... under srun."""
        env = os.environ if environ is None else environ
        job = env.get("SLURM_JOB_ID")
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), job)
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return cls(
                int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), job
            )
        return cls(slurm_job_id=job)


def relaunch_local(nproc: int, module_args: list[str]) -> int:
    """Run ``python -m <module_args>`` as ``nproc`` local ranks under ``torch.distributed.run``
    (standalone rendezvous) and return its exit code; the ranks read RANK/WORLD_SIZE from it."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    return subprocess.call(cmd + module_args)
