"""Time limits and preemption on SLURM: save at the next step boundary, requeue, resume.

SLURM sends SIGUSR1 ``grace`` seconds before the time limit (``--signal=B:USR1@grace``; the
batch script forwards it to the ranks) and SIGTERM on preemption. :class:`PreemptionCallback`
turns either into a flag; after the current step all ranks agree on it (one all-reduce), the
checkpoint callback saves, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and every rank stops
with :class:`JobRequeued`. The requeued job resumes from that checkpoint like any re-run.

A training failure also requeues the job (it resumes from the last checkpoint), within a restart
budget: when more than ``max_restarts`` restarts in a row would resume from the same step (no
progress), the job is not requeued again and the reason is logged and written to
``<run_dir>/restarts.json`` (which records every restart and its step).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cluster.slurm import SlurmError, check_job_id, slurm
from pretrain.trainer.callbacks.base import Callback

logger = logging.getLogger(__name__)

LEDGER = "restarts.json"


class JobRequeued(KeyboardInterrupt):
    """The job was told to stop, saved and requeued itself; the run resumes in the requeued job.

    An interruption, not a failure: like Ctrl-C, the MLflow run is marked KILLED (then RUNNING
    again on resume) and the ``pretrain`` command exits 130 with "re-run to resume".
    """


class RestartBudgetExceeded(RuntimeError):
    """The job stopped making progress across restarts and was not requeued again."""


def load_ledger(run_dir: Path) -> dict[str, Any]:
    """The run's restart record: ``{"events": [...], "stopped": reason | None}``."""
    path = Path(run_dir) / LEDGER
    if path.is_file():
        return json.loads(path.read_text())
    return {"events": [], "stopped": None}


def _save_ledger(run_dir: Path, ledger: dict[str, Any]) -> None:
    path = Path(run_dir) / LEDGER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger, indent=2))
    os.replace(tmp, path)


class PreemptionCallback(Callback):
    """Saves and requeues on SIGUSR1/SIGTERM; requeues after failures within a restart budget.

    Args:
        run_dir: where ``restarts.json`` is kept.
        job_id: the SLURM job to requeue; ``None`` saves and stops without requeueing.
        max_restarts: restarts in a row from the same step before giving up.
        restart_count: SLURM_RESTART_COUNT of this job (recorded).
        requeue_on_failure: requeue when training raises (resumes from the last checkpoint).
        signals: the signals that mean "save and requeue".
        check_interval: steps between the all-reduces that agree on the flag (multi-rank).
    """

    priority = 50  # post_step after the checkpoint callback's, on_error before MLflow's

    def __init__(
        self,
        run_dir: Path,
        *,
        job_id: str | None = None,
        max_restarts: int = 3,
        restart_count: int = 0,
        requeue_on_failure: bool = True,
        signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM),
        check_interval: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.job_id = check_job_id(job_id) if job_id else None
        self.max_restarts = max_restarts
        self.restart_count = restart_count
        self.requeue_on_failure = requeue_on_failure
        self.signals = signals
        self.check_interval = max(1, check_interval)
        self.received: int | None = None
        self.start_step = 0
        self._previous: dict[int, Any] = {}

    @classmethod
    def from_environ(cls, run_dir: Path, environ: dict[str, str] | None = None) -> PreemptionCallback:
        """From SLURM_JOB_ID, SLURM_RESTART_COUNT and PRETRAIN_MAX_RESTARTS (set by the script)."""
        env = os.environ if environ is None else environ
        return cls(
            run_dir,
            job_id=env.get("SLURM_JOB_ID"),
            max_restarts=int(env.get("PRETRAIN_MAX_RESTARTS", 3)),
            restart_count=int(env.get("SLURM_RESTART_COUNT", 0) or 0),
        )

    # -- signals ---------------------------------------------------------------------------------

    def post_attach(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGUSR1/SIGTERM will not trigger a save")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum  # acted on at the next step boundary

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -- training hooks --------------------------------------------------------------------------

    def pre_train(self) -> None:
        self.start_step = self.trainer.step
        if self.restart_count:
            logger.info(
                "job %s restart %d: resuming at step %d", self.job_id, self.restart_count, self.start_step
            )

    def post_step(self, step: int) -> None:
        if step % self.check_interval and self.received is None:
            return
        if not self._agree(self.received is not None):
            return
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        saved = self._save(step)
        reason = f"{name} at step {step}"
        if not self.trainer.is_main:
            raise JobRequeued(reason)
        if self.job_id is None:
            raise JobRequeued(f"{reason}: saved step {saved}; not under SLURM, re-run to resume")
        if self._requeue("preempted", resume_step=saved, step=step, reason=reason):
            raise JobRequeued(f"{reason}: saved step {saved}, requeued job {self.job_id}")
        raise RestartBudgetExceeded(load_ledger(self.run_dir)["stopped"])

    def on_error(self, exc: BaseException) -> None:
        if isinstance(exc, (KeyboardInterrupt, RestartBudgetExceeded)) or self.job_id is None:
            return
        if not self.trainer.is_main or not self.requeue_on_failure:
            return
        ckpt = self.trainer.callbacks.get("checkpoint")
        resume = getattr(ckpt, "last_saved_step", None) or 0
        step = self.trainer.step
        logger.error(
            "training failed at step %d (%s); a requeued job resumes from step %d, redoing %d steps",
            step,
            type(exc).__name__,
            resume,
            step - resume,
        )
        self._requeue("failed", resume_step=resume, step=step, reason=f"{type(exc).__name__}: {exc}")

    # -- helpers ---------------------------------------------------------------------------------

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank has the flag (one all-reduce when distributed)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _save(self, step: int) -> int:
        """Save the current step (unless just saved); returns the step a restart resumes from."""
        ckpt = self.trainer.callbacks.get("checkpoint")
        if ckpt is None:
            logger.warning("no checkpoint callback: a restart redoes every step up to %d", step)
            return 0
        if ckpt.last_saved_step != step:
            path = ckpt.save()
            logger.info("stop requested: saved step %d to %s; no finished step is lost", step, path)
        else:
            logger.info("stop requested: step %d was just saved; no finished step is lost", step)
        return step

    def _requeue(self, kind: str, *, resume_step: int, step: int, reason: str) -> bool:
        """Record the restart and requeue, unless the budget of restarts without progress is spent."""
        ledger = load_ledger(self.run_dir)
        events = ledger["events"]
        stalled = 1
        for event in reversed(events):
            if event.get("resume_step") != resume_step:
                break
            stalled += 1
        event = {
            "time": time.time(),
            "job_id": self.job_id,
            "restart_count": self.restart_count,
            "kind": kind,
            "step": step,
            "resume_step": resume_step,
            "reason": reason[:2000],
        }
        if stalled > self.max_restarts:
            ledger["stopped"] = (
                f"not requeued: {stalled} restarts in a row would resume from step {resume_step} "
                f"without progress (max_restarts={self.max_restarts}); last: {kind}: {reason[:500]}"
            )
            event["kind"] = f"{kind}, not requeued"
            events.append(event)
            _save_ledger(self.run_dir, ledger)
            logger.error("job %s %s", self.job_id, ledger["stopped"])
            return False
        events.append(event)
        ledger["stopped"] = None
        _save_ledger(self.run_dir, ledger)
        try:
            slurm("scontrol", "requeue", self.job_id)
        except SlurmError as exc:
            logger.error("could not requeue job %s: %s", self.job_id, exc)
            return False
        logger.warning(
            "requeued job %s (%s at step %d; it resumes from step %d)", self.job_id, kind, step, resume_step
        )
        return True
