"""The callback protocol: every side concern of training (checkpoints, speed, memory, metrics
sinks, evaluation, stability, progress) hooks into the loop here instead of growing it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pretrain.trainer.trainer import Trainer


class Callback:
    """Base class; override the hooks you need. Lower ``priority`` runs first."""

    priority: ClassVar[int] = 0
    trainer: Trainer

    def post_attach(self) -> None:
        """The trainer is set; nothing has run yet."""

    def pre_train(self) -> None:
        """Before the first step (after a resume has restored state)."""

    def pre_step(self, step: int) -> None:
        """Before optimizer step ``step`` (1-based) loads its data."""

    def post_step(self, step: int) -> None:
        """After optimizer step ``step``; record metrics with ``trainer.record_metric``."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Collected metrics of ``step``, delivered in order every ``log_interval`` steps."""

    def post_train(self) -> None:
        """After the last step, metrics flushed."""

    def on_error(self, exc: BaseException) -> None:
        """Training raised ``exc``; it is re-raised after every callback has seen it."""

    def close(self) -> None:
        """Always called last, on success or failure."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
