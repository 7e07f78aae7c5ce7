"""Test entry point for SLURM jobs: ``pretrain`` with the SLURM callbacks added.

Until ``pretrain/train.py`` registers :class:`PreemptionCallback` and :class:`RunTagsCallback`
itself under SLURM, the tests' jobs run ``python -m tests.cluster.slurm_entry train CONFIG``,
which adds them to the trainer built by ``run_training``; when train.py already has them this
is plain ``pretrain``.
"""

from __future__ import annotations

import os
import sys

import pretrain.train as train_mod
from cluster.preemption import PreemptionCallback
from cluster.run_tags import RunTagsCallback, run_tags
from pretrain.cli import main
from pretrain.trainer.callbacks.base import Callback

_Trainer = train_mod.Trainer


class _FailAt(Callback):
    """Raises after step ``PRETRAIN_TEST_FAIL_AT_STEP`` (tests of the restart budget)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def post_step(self, step: int) -> None:
        if step == self.step:
            raise RuntimeError(f"injected failure at step {step}")


class _SlurmTrainer(_Trainer):
    def __init__(self, *, callbacks, **kwargs):
        callbacks = dict(callbacks)
        run_dir = callbacks["metrics_file"].path.parent
        if not any(isinstance(cb, PreemptionCallback) for cb in callbacks.values()):
            callbacks["preemption"] = PreemptionCallback.from_environ(run_dir)
        if "mlflow" in callbacks and not any(isinstance(cb, RunTagsCallback) for cb in callbacks.values()):
            callbacks["run_tags"] = RunTagsCallback(run_tags())
        if os.environ.get("PRETRAIN_TEST_FAIL_AT_STEP"):
            callbacks["fail_at"] = _FailAt(int(os.environ["PRETRAIN_TEST_FAIL_AT_STEP"]))
        super().__init__(callbacks=callbacks, **kwargs)


train_mod.Trainer = _SlurmTrainer

if __name__ == "__main__":
    sys.exit(main())
