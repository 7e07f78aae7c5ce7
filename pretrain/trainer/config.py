"""The ``train`` section: optimisation, precision, schedule and evaluation cadence."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from pretrain.config import Config


class TrainConfig(Config):
    """How the model is optimised. Step counts are optimizer steps (after accumulation)."""

    steps: int = 300
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Samples per forward/backward on each data-parallel rank."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to ``lr * min_lr_ratio`` at the last step."""
    warmup_steps: int = 30
    """Linear warmup from 0 to ``lr`` over this many steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to vectors or scalars)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: ``auto`` uses bf16 autocast on GPUs that support it and fp32 elsewhere."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: ``auto`` picks CUDA when available."""
    seed: int = 1234
    """Seed of the weight init and of every random draw during training."""
    log_interval: int = 10
    """Steps between metric collections (one host sync and one batched MLflow call per interval)."""
    eval_interval: int = 100
    """Steps between held-out evaluations (0 = only at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; ``None`` looks it up from the device (GPU table, CPU estimate)."""
    spike_factor: float = 3.0
    """A loss above ``spike_factor`` x its running mean is counted as a spike (stability metric)."""
    threads: int | None = None
    """CPU threads for torch; ``None`` keeps torch's default."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("train.lr must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.min_lr_ratio must be within [0, 1]")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.grad_clip < 0:
            raise ValueError("train.warmup_steps, eval_interval and grad_clip must be >= 0")
        return self
