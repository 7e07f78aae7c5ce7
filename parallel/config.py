"""The ``parallel`` section of a run config: degrees and engine choice.

Degree arithmetic is validated here, without any process group, so an impossible layout fails
before work starts. The engines that realise tp/pp/cp > 1 and ZeRO build on this config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from pretrain.config import Config


class ParallelConfig(Config):
    """How one run is laid out over processes. ``dp`` is derived: world size / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel degree (attention heads and SGLU columns split across ranks)."""
    pp: int = 1
    """Pipeline-parallel degree (layers split into stages)."""
    cp: int = 1
    """Context-parallel degree (the sequence split across ranks, LASP for linear attention)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism in the norm/residual regions (megatron engine, tp > 1)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (0 = off)."""
    offload: bool = False
    """Offload optimizer state to CPU (DeepSpeed ZeRO-Offload)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in the backward pass: none, every layer, or named module types."""
    microbatches: int = 1
    """Reserved: the pipeline runs ``train.grad_accum`` micro-batches per step; values > 1 are refused."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (> 1: megatron's interleaved 1F1B schedule; needs n_layers
    divisible by pp * virtual_stages and train.grad_accum >= pp)."""
    engine: Literal["native", "megatron", "deepspeed"] = "native"
    """Which runtime applies the layout: plain PyTorch (one process), megatron-core, or DeepSpeed."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        for name in ("tp", "pp", "cp", "microbatches", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1")
        if self.zero_stage >= 2 and self.pp > 1 and self.engine == "deepspeed":
            raise ValueError(
                "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism: set parallel.zero_stage<=1 or parallel.pp=1"
            )
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError("parallel.virtual_stages > 1 needs parallel.pp > 1")
        return self

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def dp_for(self, world_size: int) -> int:
        """The data-parallel degree for ``world_size`` processes; raises if they do not divide."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.model_parallel_size}: "
                "change parallel.tp/pp/cp or the number of processes"
            )
        return world_size // self.model_parallel_size
