"""When to save and what to resume from; how to save lives in :mod:`checkpoints`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from checkpoints import Checkpointer, load_checkpoint
from pretrain.trainer.callbacks.base import Callback

logger = logging.getLogger(__name__)


class CheckpointCallback(Callback):
    """Resumes from the latest valid checkpoint before training, saves every ``interval`` steps
    and at the end.

    Args:
        checkpointer: the store (atomic saves, manifest, retention).
        interval: optimizer steps between saves.
        metadata: static facts recorded in every manifest (resolved config, tokenizer, code).
        files: extra files copied into every checkpoint (tokenizer model, config).
    """

    priority = -100  # restore state before any other callback starts

    def __init__(
        self,
        checkpointer: Checkpointer,
        interval: int,
        *,
        metadata: dict[str, Any] | None = None,
        files: dict[str, Path] | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.interval = interval
        self.metadata = metadata or {}
        self.files = files or {}
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None

    def pre_train(self) -> None:
        path = self.checkpointer.latest()
        if path is None:
            return
        loaded = load_checkpoint(path)
        self.trainer.train_module.load_state_dict(
            {k: loaded.state[k] for k in ("model", "optimizer", "scheduler")}
        )
        self.trainer.load_state_dict(loaded.state["trainer"])
        self.last_saved_step = self.trainer.step
        self.resumed_from = path
        self.trainer.results["resumed_from_step"] = self.trainer.step
        logger.info("resumed from %s (step %d)", path, self.trainer.step)

    def post_step(self, step: int) -> None:
        if step % self.interval == 0 and step < self.trainer.max_steps:
            self.save()

    def post_train(self) -> None:
        if self.last_saved_step != self.trainer.step:
            self.save()
        self.trainer.results["checkpoint"] = str(self.checkpointer.latest())

    def save(self) -> Path:
        trainer = self.trainer
        # Deliver pending metrics first: a run resumed from this checkpoint never re-does
        # these steps, so their metrics must be out before the save.
        trainer.flush_metrics()
        state = dict(trainer.train_module.state_dict())
        state["trainer"] = trainer.state_dict()
        if not trainer.is_main:
            return self.checkpointer.root
        metadata = {
            **self.metadata,
            "step": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "data_position": trainer.loader.state_dict(),
        }
        path = self.checkpointer.save(trainer.step, state, metadata=metadata, files=self.files)
        self.last_saved_step = trainer.step
        return path
