"""The ``finetune`` config: which checkpoint to start from, which stage, and its data.

::

    name: sft-tiny
    init_from: tnl-tiny:stable     # registry ref, checkpoint/run dir, or HF layout dir
    stage: sft                     # continued | sft | lora
    instructions: {english: ..., translated: {zh: ...}, bitext: {zh: ...}, seq_len: 256}
    train / parallel / checkpoint / tracking: as in a pretraining run config
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from checkpoints import CheckpointConfig
from parallel.config import ParallelConfig
from pretrain.config import Config
from pretrain.data.loader import DataConfig
from pretrain.finetune.lora import LoRAConfig
from pretrain.tracking import TrackingConfig
from pretrain.trainer.config import TrainConfig


class RegistryConfig(Config):
    """Where registered checkpoints live."""

    store: str = "runs/registry"
    """Directory holding the registered checkpoint files (and, by default, the registry database)."""
    tracking_uri: str | None = None
    """MLflow registry URI; ``None`` means ``sqlite:///<store>/registry.db``."""

    def build(self):
        from checkpoints.registry import CheckpointRegistry

        return CheckpointRegistry(self.store, self.tracking_uri)


class InstructionDataConfig(Config):
    """An x-LLaMA style instruction mixture (see :mod:`pretrain.finetune.instructions`)."""

    english: str | None = None
    """JSONL of English general instructions: ``{"instruction", "input", "output"}`` per line."""
    translated: dict[str, str] = Field(default_factory=dict)
    """Language code -> JSONL of the same instructions translated into that language."""
    bitext: dict[str, str] = Field(default_factory=dict)
    """Language code -> JSONL of translation pairs ``{"en": ..., "<code>": ...}``; each becomes a
    translation instruction with the non-English side as the target."""
    language_names: dict[str, str] = Field(default_factory=dict)
    """Language code -> name used in the prompt templates (default: a built-in table, else the code)."""
    seq_len: int = Field(default=256, gt=1)
    """Tokens per training sample (may differ from the parent's)."""
    packing: bool = True
    """Pack examples back to back into ``seq_len`` samples; ``False`` pads one example per sample."""
    max_examples: int | None = Field(default=None, gt=0)
    """Use at most this many examples of the shuffled mixture."""
    eval_examples: int = Field(default=0, ge=0)
    """Hold out this many examples of the mixture for evaluation."""
    seed: int = 0
    """Shuffle seed of the mixture."""

    @model_validator(mode="after")
    def _some_data(self) -> InstructionDataConfig:
        if not (self.english or self.translated or self.bitext):
            raise ValueError(
                "give at least one of instructions.english, instructions.translated, instructions.bitext"
            )
        return self

    def files(self) -> list[Path]:
        return [Path(p) for p in [self.english, *self.translated.values(), *self.bitext.values()] if p]


class StageConfig(Config):
    """A finetuning stage on a saved checkpoint."""

    name: str = "finetune"
    """Stage run name: names the run directory and the MLflow run."""
    run_dir: str | None = None
    """Where checkpoints, logs and the pulled parent go; ``None`` means ``runs/<name>``."""
    init_from: str
    """The parent: a registry ref ``name[:version|alias]``, a checkpoint or run directory, or a
    released Hugging Face layout directory (``config.json`` + weights)."""
    stage: Literal["continued", "sft", "lora"] = "sft"
    """``continued`` pretraining on token shards, ``sft`` (full weights) or ``lora`` on an
    instruction mixture."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """The checkpoint registry ``init_from`` refs are resolved in."""
    data: DataConfig | None = None
    """Token shards for ``continued`` (``data.tokenizer`` must be the parent's tokenizer)."""
    instructions: InstructionDataConfig | None = None
    """The instruction mixture for ``sft`` and ``lora``."""
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    """Adapter shape for ``stage: lora``."""
    attention_block_size: int | None = Field(default=None, gt=0)
    """Override the parent's attention block size (a speed knob: the function is unchanged)."""
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=2e-5, weight_decay=0.0))
    """Optimisation (x-LLaMA: lr 2e-5, cosine, warmup 3%, weight decay 0)."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Process layout; may differ from the parent's."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="finetune"))
    """MLflow tracking."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a directory)")
        return v

    @model_validator(mode="after")
    def _stage_data(self) -> StageConfig:
        if self.stage == "continued" and self.data is None:
            raise ValueError("stage=continued needs a data section (token shards)")
        if self.stage in ("sft", "lora") and self.instructions is None:
            raise ValueError(f"stage={self.stage} needs an instructions section")
        if self.stage == "lora" and self.parallel.engine != "native":
            raise ValueError("stage=lora runs on parallel.engine=native only")
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def config_hash(self) -> str:
        """A short hash of the resolved stage config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def seq_len(self) -> int:
        return self.data.seq_len if self.stage == "continued" else self.instructions.seq_len
