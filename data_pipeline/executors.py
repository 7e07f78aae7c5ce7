"""Where datatrove stages run: a local process pool or SLURM job arrays.

An :class:`ExecutorFactory` builds the datatrove executor of each stage and runs a chain of
stages (each reading what the previous one wrote):

- :class:`LocalExecutorFactory`: ``LocalPipelineExecutor``, the stages one after another.
- :class:`SlurmExecutorFactory`: ``SlurmPipelineExecutor``, every stage a job array (plus
  datatrove's stats job) that waits for the previous stage with ``afterok`` (``depends=``). The
  whole chain is submitted at once, then this process waits for each stage's completion markers
  in order. Jobs carry ``--kill-on-invalid-dep=yes``, so a failed stage cancels the stages after
  it instead of leaving them pending forever; on failure, timeout or interrupt the chain's jobs
  still queued are cancelled.

Finished tasks are skipped on re-run with either (``skip_completed``).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@contextmanager
def _datatrove_logs_off() -> Iterator[None]:
    """Silence datatrove's console logging in this process (its per-task logs are still written)."""
    from loguru import logger

    logger.disable("datatrove")
    try:
        yield
    finally:
        logger.enable("datatrove")


class ExecutorFactory:
    """Builds one datatrove executor per stage and runs a chain of them (local by default)."""

    local = True
    """Stages run in this process or its pool (not in separate jobs)."""

    def build(
        self,
        pipeline: list[Any],
        *,
        name: str,
        tasks: int,
        workers: int,
        logging_dir: Path,
        depends: Any = None,
        tasks_per_job: int = 1,
    ) -> Any:
        """The executor of one stage.

        Args:
            pipeline: datatrove steps.
            name: stage name (names SLURM jobs).
            tasks: datatrove tasks (ranks).
            workers: tasks running at once.
            logging_dir: datatrove's logs, per-task stats and completion markers.
            depends: the executor of the stage this one reads from (SLURM: ``afterok``).
            tasks_per_job: ranks one SLURM job runs one after another (light stages: all).
        """
        executor_class, jobs, options = self._backend(
            name=name, tasks=tasks, depends=depends, tasks_per_job=tasks_per_job
        )
        return executor_class(
            pipeline,
            tasks=tasks,
            workers=max(1, min(workers, jobs)),
            logging_dir=str(logging_dir),
            skip_completed=True,
            **options,
        )

    def _backend(
        self, *, name: str, tasks: int, depends: Any, tasks_per_job: int
    ) -> tuple[type, int, dict[str, Any]]:
        """The datatrove executor class of a stage, how many units it schedules (local: tasks,
        SLURM: jobs; ``workers`` is capped at that) and the class's own arguments."""
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor, tasks, {}

    def run_chain(self, executors: Sequence[Any]) -> None:
        """Run the stages in order, each to completion."""
        for executor in executors:
            executor.run()


LocalExecutorFactory = ExecutorFactory


def default_venv_activate() -> str | None:
    """``bin/activate`` of the environment running this process, when it is a venv."""
    path = Path(sys.prefix) / "bin" / "activate"
    return str(path) if sys.prefix != sys.base_prefix and path.is_file() else None


@dataclass
class SlurmExecutorFactory(ExecutorFactory):
    """Stages as SLURM job arrays (datatrove's ``SlurmPipelineExecutor``), chained with ``afterok``."""

    partition: str
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    venv_path: str | None = None
    """``.../bin/activate`` the jobs source; ``None``: this process's venv (when it runs in one)."""
    qos: str | None = None
    job_name: str = "data"
    """Prefix of the job names (``<job_name>-<stage>``)."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    poll_seconds: float = 30.0
    """How often the completion markers and the queue are checked."""
    wait_timeout_s: float | None = None
    """Give up (cancel the chain's jobs, raise ``TimeoutError``) after this long; ``None``: never."""
    local = False

    def _backend(
        self, *, name: str, tasks: int, depends: Any, tasks_per_job: int
    ) -> tuple[type, int, dict[str, Any]]:
        from datatrove.executor import SlurmPipelineExecutor

        options = {
            "time": self.time,
            "partition": self.partition,
            "cpus_per_task": self.cpus_per_task,
            "mem_per_cpu_gb": self.mem_per_cpu_gb,
            "venv_path": self.venv_path or default_venv_activate(),
            "qos": self.qos or "",
            "job_name": f"{self.job_name}-{name}",
            "sbatch_args": {"kill-on-invalid-dep": "yes", **self.sbatch_args},
            "depends": depends,
            "tasks_per_job": tasks_per_job,
        }
        return SlurmPipelineExecutor, math.ceil(tasks / tasks_per_job), options

    def run_chain(self, executors: Sequence[Any]) -> None:
        """Submit every stage (each ``afterok`` on the one before), then wait for each in order."""
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        submitted: list[Any] = []
        try:
            with _datatrove_logs_off():
                for executor in executors:
                    executor.run()  # launches the job array (or skips a finished stage: job_id -1)
                    submitted.append(executor)
            for executor in executors:
                wait_for_slurm(executor, self.poll_seconds, deadline=deadline)
        except BaseException:
            cancel_jobs([e.job_id for e in submitted])
            raise


def _in_queue(job_id: str) -> bool:
    """Whether any task of the job is pending, running or completing (unknown counts as queued)."""
    proc = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:
        return "Invalid job id" not in proc.stderr  # a finished job SLURM already forgot, or a hiccup
    return bool(proc.stdout.strip())


def cancel_jobs(job_ids: Sequence[Any]) -> None:
    """``scancel`` the given jobs (ids ``None``/``-1`` of unsubmitted or skipped stages are ignored)."""
    ids = [str(j) for j in job_ids if j not in (None, -1, "-1")]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def wait_for_slurm(
    executor: Any,
    poll_seconds: float,
    *,
    in_queue: Callable[[str], bool] = _in_queue,
    sleep: Callable[[float], Any] = time.sleep,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until every task of a submitted stage has its completion marker.

    Args:
        deadline: a ``clock()`` time after which waiting stops with ``TimeoutError``.

    Raises:
        RuntimeError: the job left the queue with tasks unfinished (names them and the logs).
        TimeoutError: ``deadline`` passed with tasks unfinished.
    """
    while incomplete := executor.get_incomplete_ranks():
        job_id = executor.job_id
        logs = f"{executor.logging_dir.resolve_paths('')} (logs/, slurm_logs/)"
        if job_id in (None, -1) or not in_queue(job_id):
            sleep(min(poll_seconds, 5.0))  # completion markers may lag behind the queue
            if incomplete := executor.get_incomplete_ranks():
                raise RuntimeError(
                    f"SLURM job {job_id} ended with {len(incomplete)} unfinished task(s) "
                    f"{incomplete[:10]}; see {logs}"
                )
            return
        if deadline is not None and clock() > deadline:
            raise TimeoutError(
                f"SLURM job {job_id} still has {len(incomplete)} unfinished task(s) "
                f"{incomplete[:10]} at the deadline; see {logs}"
            )
        sleep(poll_seconds)
