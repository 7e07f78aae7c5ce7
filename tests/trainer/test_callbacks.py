"""Callbacks in a real loop: a diverged run stops before its state is saved; throughput,
MFU and memory are recorded; the speed monitor's MFU uses the model's FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import Checkpointer
from pretrain.data.loader import Batch
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.callbacks.base import Callback
from pretrain.trainer.callbacks.checkpoint import CheckpointCallback
from pretrain.trainer.callbacks.memory_monitor import MemoryMonitorCallback
from pretrain.trainer.callbacks.speed_monitor import SpeedMonitorCallback
from pretrain.trainer.callbacks.stability import StabilityCallback, TrainingInstabilityError
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import TrainModule
from pretrain.trainer.trainer import Trainer

CFG = TransNormerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, glu_dim=48)


class RandomLoader:
    """Stands in for the dataset loader: fresh random tokens, same interface."""

    dp_size = 1

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)
        self.consumed_samples = 0

    def next_micro_batch(self) -> Batch:
        t = torch.randint(0, 64, (2, 17), generator=self.gen)
        self.consumed_samples += 2
        return Batch(t[:, :-1], t[:, 1:], torch.ones(2, 16))

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = state["consumed_samples"]


class PoisonAt(Callback):
    """Corrupts a weight before step ``step``, as a numerical blow-up would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def pre_step(self, step: int) -> None:
        if step == self.step:
            with torch.no_grad():
                next(self.trainer.train_module.model.parameters()).fill_(float("nan"))


def _trainer(callbacks: dict[str, Callback], steps: int = 8, log_interval: int = 4) -> Trainer:
    torch.manual_seed(0)
    module = TrainModule(CFG.build(), TrainConfig(steps=steps, warmup_steps=1), torch.device("cpu"))
    return Trainer(
        train_module=module,
        loader=RandomLoader(),
        callbacks=callbacks,
        max_steps=steps,
        log_interval=log_interval,
    )


def test_diverged_state_is_never_saved(tmp_path: Path) -> None:
    store = Checkpointer(tmp_path / "ckpt")
    trainer = _trainer(
        {
            "checkpoint": CheckpointCallback(store, interval=3),
            "stability": StabilityCallback(),
            "poison": PoisonAt(5),
        },
        steps=8,
        log_interval=100,  # the save at step 6 is what collects the metrics
    )
    with pytest.raises(TrainingInstabilityError, match="step 5"):
        trainer.fit()
    assert [s for s, _ in store.list()] == [3]


def test_spikes_are_counted() -> None:
    cb = StabilityCallback(spike_factor=2.0)
    cb.trainer = _trainer({})
    for step, loss in enumerate([4.0, 4.0, 9.0, 4.0], start=1):
        cb.log_metrics(step, {"train/loss": loss})
    assert cb.spikes == 1


def test_speed_and_memory_are_recorded() -> None:
    seen: dict[int, dict[str, float]] = {}

    class Sink(Callback):
        def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
            seen[step] = metrics

    flops = CFG.flops_per_token(16)
    trainer = _trainer(
        {
            "speed": SpeedMonitorCallback(flops, tokens_per_step=32, peak=1e12),
            "mem": MemoryMonitorCallback(),
            "sink": Sink(),
        }
    )
    results = trainer.fit()
    assert sorted(seen) == list(range(1, 9))
    for step in (4, 8):
        tps = seen[step]["throughput/tokens_per_second"]
        assert tps > 0
        assert seen[step]["throughput/mfu"] == pytest.approx(100 * tps * flops / 1e12)
        assert seen[step]["memory/peak_gib"] > 0
    assert "throughput/tokens_per_second" not in seen[3]
    assert results["tokens_per_second"] > 0 and results["peak_memory_gib"] > 0
