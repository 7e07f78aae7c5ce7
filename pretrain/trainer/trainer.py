"""The training loop: counters, data, the step, and hook dispatch to callbacks.

Metrics stay on the device during a step; every ``log_interval`` steps they are moved to the
host at once (one sync) and handed to the callbacks' ``log_metrics`` step by step.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from pretrain.data.loader import SampleLoader
from pretrain.trainer.callbacks.base import Callback
from pretrain.trainer.train_module import TrainModule


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``max_steps`` optimizer steps of ``train_module`` on batches from ``loader``.

    Args:
        train_module: owns model, optimizer and schedule.
        loader: yields this rank's micro-batches; its position is part of the checkpoint.
        callbacks: side concerns by name; run in ``priority`` order.
        max_steps: optimizer steps in the whole run (a resumed run continues to it).
        grad_accum: micro-batches per optimizer step.
        log_interval: steps between metric collections.
        is_main: whether this rank reports (progress, MLflow).
    """

    def __init__(
        self,
        *,
        train_module: TrainModule,
        loader: SampleLoader,
        callbacks: dict[str, Callback],
        max_steps: int,
        grad_accum: int = 1,
        log_interval: int = 10,
        is_main: bool = True,
    ) -> None:
        self.train_module = train_module
        self.loader = loader
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.log_interval = log_interval
        self.is_main = is_main
        self.step = 0
        self.start_step = 0
        self.tokens_seen = 0
        self.results: dict[str, Any] = {}
        """Run-level results callbacks publish (final loss, perplexity...), for the caller."""
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self.callbacks = dict(sorted(callbacks.items(), key=lambda kv: kv[1].priority))
        for cb in self.callbacks.values():
            cb.trainer = self
            cb.post_attach()

    @property
    def device(self) -> torch.device:
        return self.train_module.device

    def record_metric(self, name: str, value: float | torch.Tensor) -> None:
        """Attach a metric to the current step (tensors are moved to the host at collection)."""
        if not self._pending or self._pending[-1][0] != self.step:
            self._pending.append((self.step, {}))
        self._pending[-1][1][name] = value

    def flush_metrics(self) -> None:
        """Collect pending metrics (one host sync) and deliver them to every callback."""
        pending, self._pending = self._pending, []
        for step, metrics in pending:
            values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
            for cb in self.callbacks.values():
                cb.log_metrics(step, values)

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; returns ``results``."""
        try:
            for cb in self.callbacks.values():
                cb.pre_train()
            self.start_step = self.step
            while self.step < self.max_steps:
                for cb in self.callbacks.values():
                    cb.pre_step(self.step + 1)
                batches = [self.loader.next_micro_batch().to(self.device) for _ in range(self.grad_accum)]
                out = self.train_module.train_step(batches)
                self.step += 1
                self.tokens_seen += sum(b.num_tokens for b in batches) * self.loader.dp_size
                for name, value in out.items():
                    self.record_metric(f"train/{name}", value)
                for cb in self.callbacks.values():
                    cb.post_step(self.step)
                if self.step % self.log_interval == 0:
                    self.flush_metrics()
            self.flush_metrics()
            for cb in self.callbacks.values():
                cb.post_train()
        except BaseException as exc:
            for cb in self.callbacks.values():
                cb.on_error(exc)
            raise
        finally:
            for cb in self.callbacks.values():
                cb.close()
        return self.results

    def state_dict(self) -> dict[str, Any]:
        """Counters, loader position, RNG states and each callback's own state."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        for name, cb_state in state.get("callbacks", {}).items():
            if name in self.callbacks:
                self.callbacks[name].load_state_dict(cb_state)
