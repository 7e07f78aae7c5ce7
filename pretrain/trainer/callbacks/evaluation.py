"""Held-out loss and perplexity on a fixed set of validation batches."""

from __future__ import annotations

import math

from pretrain.data.loader import Batch
from pretrain.trainer.callbacks.base import Callback


class EvaluationCallback(Callback):
    """Evaluates every ``interval`` steps (0 = only at the end) and after the last step.

    Args:
        batches: the validation micro-batches, the same ones every time.
        interval: steps between evaluations.
    """

    def __init__(self, batches: list[Batch], interval: int) -> None:
        self.batches = batches
        self.interval = interval

    def _evaluate(self) -> None:
        device = self.trainer.device
        loss = self.trainer.train_module.eval_loss([b.to(device) for b in self.batches])
        ppl = math.exp(min(loss, 50.0))
        self.trainer.record_metric("eval/loss", loss)
        self.trainer.record_metric("eval/perplexity", ppl)
        self.trainer.results["heldout_loss"] = loss
        self.trainer.results["heldout_perplexity"] = ppl

    def post_step(self, step: int) -> None:
        if self.interval and step % self.interval == 0 and step != self.trainer.max_steps:
            self._evaluate()

    def post_train(self) -> None:
        self._evaluate()
        self.trainer.flush_metrics()
