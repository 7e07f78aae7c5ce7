"""The train module: accumulation equals one large batch; the LR schedule has its shape."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain.data.loader import Batch
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import TrainModule, cosine_with_warmup


def _batch(n: int, seq: int, vocab: int, gen: torch.Generator) -> Batch:
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=gen)
    mask = (torch.rand(n, seq, generator=gen) > 0.2).float()
    return Batch(tokens[:, :-1], tokens[:, 1:], mask)


def _module(accum: int, mbs: int) -> TrainModule:
    torch.manual_seed(0)
    model = TransNormerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, glu_dim=48).build()
    cfg = TrainConfig(steps=4, micro_batch_size=mbs, grad_accum=accum, warmup_steps=1, lr=1e-2)
    return TrainModule(model, cfg, torch.device("cpu"))


def test_grad_accumulation_matches_one_large_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    big = _batch(8, 24, 64, gen)
    halves = [Batch(big.tokens[i : i + 4], big.labels[i : i + 4], big.loss_mask[i : i + 4]) for i in (0, 4)]
    one, two = _module(1, 8), _module(2, 4)
    for _ in range(3):
        a, b = one.train_step([big]), two.train_step(halves)
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)
        assert torch.allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): fp32 rounding of near-zero gradients shows up at ~1e-5 after
    # three steps, against ~3e-2 of movement (lr 1e-2); a wrong accumulation is off by far more.
    for p, q in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-4)


def test_loss_is_masked_mean_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(2)
    batch = _batch(2, 16, 64, gen)
    module = _module(1, 2)
    with torch.no_grad():
        logits = module.model(batch.tokens)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    expected = (ce * batch.loss_mask.flatten()).sum() / batch.loss_mask.sum()
    assert module.eval_loss([batch]) == pytest.approx(float(expected), rel=1e-5)


def test_warmup_then_cosine_to_min_ratio() -> None:
    lrs = [cosine_with_warmup(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)
