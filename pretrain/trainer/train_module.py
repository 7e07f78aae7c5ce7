"""The train module owns the model, optimizer and LR schedule: forward/backward over the
micro-batches of one step, clipping, the optimizer step, evaluation and their state dicts.
The loop, counters and side concerns live in :class:`pretrain.trainer.trainer.Trainer`."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data.loader import Batch
from pretrain.trainer.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available (use train.device=auto)")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. bf16 only where the device computes it well."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cpu":
            return torch.bfloat16  # asked for explicitly: CPU autocast works, if slowly
        if not supported:
            raise RuntimeError("train.precision=bf16 but this GPU has no bf16 support")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the masked-in positions, in fp32."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().float()).sum()


class TrainModule:
    """Model + AdamW + warmup/cosine schedule on one device.

    Args:
        model: a built model whose ``forward(tokens)`` returns logits.
        config: the ``train`` section.
        device: where the model lives.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.autocast_dtype = resolve_dtype(config.precision, device)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=device.type == "cuda"
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(
                s, warmup=config.warmup_steps, total=config.steps, min_ratio=config.min_lr_ratio
            ),
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``micro_batches``; the loss is the mean over all their
        masked-in tokens, so accumulation gives the same gradient as one large batch.

        Returns tensors (no host sync): ``loss``, ``grad_norm`` (before clipping), ``lr``.
        """
        self.model.train()
        n_tokens = sum(mb.loss_mask.sum() for mb in micro_batches).clamp_min(1)
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            with self._autocast():
                logits = self.model(mb.tokens)
            loss = token_loss(logits, mb.labels, mb.loss_mask) / n_tokens
            loss.backward()
            total += loss.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": grad_norm.detach(), "lr": lr}

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean next-token loss (nats) over ``batches``; perplexity is ``exp`` of it."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0.0
        for mb in batches:
            with self._autocast():
                logits = self.model(mb.tokens)
            loss_sum += token_loss(logits, mb.labels, mb.loss_mask).double()
            count += float(mb.loss_mask.sum())
        self.model.train()
        return float(loss_sum) / max(count, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
