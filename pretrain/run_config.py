"""The run config: one YAML file with a section per component.

Each section's class lives beside its component; this module only composes them::

    name: tnl-tiny
    data:       pretrain.data.loader.DataConfig
    model:      pretrain.models.transnormer.TransNormerConfig
    train:      pretrain.trainer.config.TrainConfig
    parallel:   parallel.config.ParallelConfig
    checkpoint: checkpoints.CheckpointConfig
    tracking:   pretrain.tracking.TrackingConfig
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import Field, field_validator

from checkpoints import CheckpointConfig
from parallel.config import ParallelConfig
from pretrain.config import Config
from pretrain.data.loader import DataConfig
from pretrain.models.transnormer import TransNormerConfig
from pretrain.tracking import TrackingConfig
from pretrain.trainer.config import TrainConfig


class RunConfig(Config):
    """A whole training run."""

    name: str = "run"
    """Run name: names the run directory and the MLflow run."""
    run_dir: str | None = None
    """Where checkpoints, logs and the embedded MLflow store go; ``None`` means ``runs/<name>``."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Training data (tokenized shards, tokenizer, sequence length)."""
    model: TransNormerConfig = Field(default_factory=TransNormerConfig)
    """The TransNormerLLM shape."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, precision, schedule, evaluation."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Process layout (tensor/pipeline/context parallel degrees, ZeRO, activation checkpointing)."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a directory)")
        return v

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.resolved_run_dir / "checkpoints"

    def config_hash(self) -> str:
        """A short hash of the resolved config, for telling runs apart."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
