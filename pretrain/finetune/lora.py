"""LoRA: low-rank adapters on the Linear layers of a TransNormerLLM, merged back for export.

:func:`apply_lora` replaces each targeted ``nn.Linear`` by a :class:`LoRALinear` that keeps the
frozen ``weight`` under the same name and adds ``lora_A`` (r x in) and ``lora_B`` (out x r,
zero-initialised, so the model's function is unchanged at the start):
``y = x W^T + (alpha / r) * x A^T B^T``. Only the adapters train (the optimizer takes parameters
with ``requires_grad``). A LoRA checkpoint stores the adapters next to the frozen weights;
:func:`merge_lora_state` is the state-dict adapter that folds them into plain weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from pretrain.config import Config

LORA_A, LORA_B = "lora_A", "lora_B"


class LoRAConfig(Config):
    """Low-rank adaptation of the model's Linear layers."""

    rank: int = Field(default=8, gt=0)
    """Adapter rank ``r``."""
    alpha: float = Field(default=16.0, gt=0)
    """Scale numerator: the adapter output is multiplied by ``alpha / rank``."""
    targets: list[str] = Field(default_factory=lambda: ["qkvu_proj", "out_proj", "l1", "l2", "l3"])
    """Names of the Linear modules to adapt (the last component of the module path)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (no bias: the model has none)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRA on biased Linear layers is not implemented")
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = scale
        out_f, in_f = base.weight.shape
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the targeted Linears; returns their paths.

    Raises:
        ValueError: If no module matches ``config.targets``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in config.targets:
                setattr(module, child_name, LoRALinear(child, config.rank, config.scale))
                wrapped.append(f"{path}.{child_name}" if path else child_name)
    if not wrapped:
        raise ValueError(f"lora.targets={config.targets} matches no nn.Linear of the model")
    return wrapped


def merge_lora_state(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A LoRA model's state dict -> plain weights: ``W + scale * B @ A``, adapter keys dropped."""
    out = {k: v for k, v in state.items() if not k.endswith((f".{LORA_A}", f".{LORA_B}"))}
    for key, a in state.items():
        if key.endswith(f".{LORA_A}"):
            prefix = key[: -len(LORA_A)]
            b = state[prefix + LORA_B]
            w = out[prefix + "weight"]
            out[prefix + "weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def lora_metadata(config: LoRAConfig) -> dict[str, Any]:
    """What a checkpoint records so that :func:`merge_lora_state` can fold its adapters."""
    return {"rank": config.rank, "alpha": config.alpha, "scale": config.scale, "targets": config.targets}
