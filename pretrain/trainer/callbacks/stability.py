"""Stops a diverged run before it is saved, and counts loss spikes."""

from __future__ import annotations

import logging
import math

from pretrain.trainer.callbacks.base import Callback

logger = logging.getLogger(__name__)


class TrainingInstabilityError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


class StabilityCallback(Callback):
    """Raises on a non-finite loss or gradient norm; counts spikes above ``spike_factor`` x the
    running mean of the loss. Checks run at metric collection, which always precedes a save,
    so a diverged state never becomes the latest checkpoint.
    """

    def __init__(self, spike_factor: float = 3.0, ema: float = 0.9) -> None:
        self.spike_factor = spike_factor
        self.ema = ema
        self.mean: float | None = None
        self.spikes = 0

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key in ("train/loss", "train/grad_norm"):
            if key in metrics and not math.isfinite(metrics[key]):
                raise TrainingInstabilityError(
                    f"{key} is {metrics[key]} at step {step}; stopping before it is saved"
                )
        loss = metrics.get("train/loss")
        if loss is None:
            return
        if self.mean is not None and loss > self.spike_factor * self.mean:
            self.spikes += 1
            logger.warning("loss spike at step %d: %.4f vs running mean %.4f", step, loss, self.mean)
        self.mean = loss if self.mean is None else self.ema * self.mean + (1 - self.ema) * loss

    def post_train(self) -> None:
        self.trainer.results["loss_spikes"] = self.spikes

    def state_dict(self) -> dict:
        return {"mean": self.mean, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.spikes = state.get("mean"), int(state.get("spikes", 0))
