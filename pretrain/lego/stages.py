"""The two Lego-MT training stages: which flows run and which parameters learn.

* Stage 1: Enc-Flow + Mix-Flow; the shared embedding, main encoder, m2m decoder and the active
  group's encoder branch learn.
* Stage 2: Dec-Flow; the main encoder and the shared embedding are frozen, the active group's
  decoder branch learns.
"""

from __future__ import annotations

from torch import nn

from pretrain.models.lego_mt import DEC, ENC, MIX, LegoMT

STAGE_FLOWS = {1: ENC | MIX, 2: DEC}


def set_trainable(model: LegoMT, stage: int, group: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` on ``group`` and return the trainable parameters."""
    if stage not in STAGE_FLOWS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    model.requires_grad_(False)
    if stage == 1:
        parts: list[nn.Module] = [model.embed, model.main, model.m2m, model.encoder(group)]
    else:
        parts = [model.decoder(group)]
    for part in parts:
        part.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
