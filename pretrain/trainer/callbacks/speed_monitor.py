"""Throughput and model FLOPs utilisation, measured over each logging window."""

from __future__ import annotations

import time

import torch

from pretrain.trainer.callbacks.base import Callback
from pretrain.trainer.flops import peak_flops


class SpeedMonitorCallback(Callback):
    """Records ``throughput/tokens_per_second`` and ``throughput/mfu`` (percent) per window.

    The first step of a process (allocator warm-up, lazy init) is left out of the averages.

    Args:
        flops_per_token: training FLOPs per token of the model (forward + backward).
        tokens_per_step: tokens in one optimizer step on this rank.
        peak: peak FLOP/s of all devices together; ``None`` looks up one device's and multiplies
            it by ``devices``.
        devices: how many devices run the step.
    """

    def __init__(
        self, flops_per_token: float, tokens_per_step: int, peak: float | None = None, devices: int = 1
    ) -> None:
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.peak = peak
        self.devices = devices
        self._window_start: float | None = None
        self._window_steps = 0
        self._total_time = 0.0
        self._total_steps = 0

    def pre_train(self) -> None:
        if self.peak is None:
            self.peak = peak_flops(self.trainer.device) * self.devices

    def _sync(self) -> None:
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)

    def post_step(self, step: int) -> None:
        if step == self.trainer.start_step + 1:  # warm-up step: start timing after it
            self._sync()
            self._window_start = time.perf_counter()
            return
        self._window_steps += 1
        if step % self.trainer.log_interval and step != self.trainer.max_steps:
            return
        self._sync()
        now = time.perf_counter()
        assert self._window_start is not None
        dt = now - self._window_start
        tps = self._window_steps * self.tokens_per_step / dt
        self.trainer.record_metric("throughput/tokens_per_second", tps)
        self.trainer.record_metric("throughput/mfu", 100.0 * tps * self.flops_per_token / self.peak)
        self._total_time += dt
        self._total_steps += self._window_steps
        self._window_start, self._window_steps = now, 0

    def state_dict(self) -> dict:
        return {"total_time": self._total_time, "total_steps": self._total_steps}

    def load_state_dict(self, state: dict) -> None:
        self._total_time = float(state.get("total_time", 0.0))
        self._total_steps = int(state.get("total_steps", 0))

    def post_train(self) -> None:
        if self._total_steps:
            tps = self._total_steps * self.tokens_per_step / self._total_time
            self.trainer.results["tokens_per_second"] = tps
            self.trainer.results["mfu_percent"] = 100.0 * tps * self.flops_per_token / self.peak
