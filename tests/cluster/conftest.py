"""SLURM fixtures: the real local cluster (started here when not running) and job helpers."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.jobs import JobInfo, job_status
from cluster.slurm import slurm


@pytest.fixture
def jobs(slurm_cluster: Path) -> Iterator[list[str]]:
    """Append job ids here; any still queued or running is cancelled after the test."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        slurm("scancel", job_id, check=False)


def run_cli(argv: list[str]) -> int:
    """Run a cluster subcommand through the same parser ``pretrain`` uses."""
    from cluster.cli import add_cluster_commands

    parser = argparse.ArgumentParser(prog="pretrain")
    add_cluster_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def wait_state(job_id: str, states: set[str], timeout: float = 120) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = job_status(job_id)
        if info.state in states:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info.state} after {timeout} s (wanted {states})")
        time.sleep(0.5)


def release_requeued(job_id: str, restarts: int, timeout: float = 90) -> JobInfo:
    """Wait until the job was requeued ``restarts`` times, then start it now (skip the hold-off)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_status(job_id)
        if info.restarts >= restarts and info.state == "PENDING":
            slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
        elif info.restarts >= restarts and info.state not in {"REQUEUED", "COMPLETING"}:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not restarted {restarts}x after {timeout} s: {info}")
        time.sleep(0.5)


def wait_for_step(metrics: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= step:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{metrics} did not reach step {step} in {timeout} s")
