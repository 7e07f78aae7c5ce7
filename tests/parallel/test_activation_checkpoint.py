"""Activation checkpointing: same numbers as without it, recomputation happens, less peak memory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from parallel.activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from pretrain.data.loader import Batch
from pretrain.models.transnormer.config import TransNormerConfig
from pretrain.models.transnormer.model import GatedLinearAttention, TransNormerLayer
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import TrainModule, token_loss

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(
    vocab_size=64, d_model=32, n_layers=3, n_heads=4, glu_dim=48, lrpe_layers=[1], attention_block_size=8
)


def _model(mode: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return apply_activation_checkpointing(TransNormerConfig(**CONFIG).build(), mode, **kwargs)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 41), generator=g)
    return Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 40))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    b = _batch(0)
    token_loss(model(b.tokens), b.labels, b.loss_mask).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _losses(model: nn.Module) -> list[float]:
    config = TrainConfig(steps=4, warmup_steps=1, precision="fp32", device="cpu")
    module = TrainModule(model, config, torch.device("cpu"))
    return [module.train_step([_batch(s)])["loss"].item() for s in range(4)]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradients_and_training_equal_no_checkpointing(mode: str) -> None:
    ref, ckpt = _model("none"), _model(mode)
    ref_grads, grads = _grads(ref), _grads(ckpt)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=0, msg=name)
    assert _losses(ckpt) == pytest.approx(_losses(ref), rel=1e-6)


def _forward_counts(model: nn.Module) -> Counter:
    counts: Counter = Counter()
    for name, module in model.named_modules():
        # The first sub-module of each mixer: the recomputation runs a checkpointed module's
        # ``forward`` (not ``__call__``, so its own hooks do not fire again), and it stops early
        # once the last needed activation is back, so forward (post) hooks may not fire either.
        if name.endswith(("token_mixer.qkvu_proj", "channel_mixer.l1")):
            kind = name.split(".")[-2]
            module.register_forward_pre_hook(lambda *_, kind=kind: counts.update([kind]))
    _grads(model)
    return counts


def test_recomputation_runs_the_chosen_modules_again_in_backward() -> None:
    L = CONFIG["n_layers"]
    assert _forward_counts(_model("none")) == {"token_mixer": L, "channel_mixer": L}
    assert _forward_counts(_model("full")) == {"token_mixer": 2 * L, "channel_mixer": 2 * L}
    assert _forward_counts(_model("selective")) == {"token_mixer": 2 * L, "channel_mixer": L}
    sglu = _model("selective", selective_modules=("SGLU",))
    assert _forward_counts(sglu) == {"token_mixer": L, "channel_mixer": 2 * L}


def test_transform_keeps_names_types_and_validates() -> None:
    plain, full = _model("none"), _model("full")
    assert list(full.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in full.named_parameters()] == [n for n, _ in plain.named_parameters()]
    layers = list(full.model.layers)
    assert all(isinstance(m, TransNormerLayer) and is_checkpointed(m) for m in layers)
    assert not any(is_checkpointed(m) for m in full.modules() if isinstance(m, GatedLinearAttention))
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(full, "selective")
    with pytest.raises(ValueError, match="unknown activation checkpointing mode"):
        apply_activation_checkpointing(plain, "some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no module of type"):
        apply_activation_checkpointing(plain, "selective", selective_modules=("Nope",))
    assert apply_activation_checkpointing(plain, "none") is plain


def test_custom_checkpoint_fn_gets_positional_arguments() -> None:
    """The hook for reentrant implementations such as ``deepspeed.checkpointing.checkpoint``."""
    calls = []

    def reentrant(fn, *args):
        calls.append(len(args))
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=True)

    ref_grads = _grads(_model("none"))
    grads = _grads(_model("full", checkpoint_fn=reentrant))
    assert calls == [1] * CONFIG["n_layers"]
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=0, msg=name)


def _saved_activation_bytes(mode: str) -> int:
    """Bytes the forward keeps for the backward (parameters excluded), counted once per storage.

    This is what checkpointing exists to cut; unlike peak RSS it does not move with the
    allocator or with other processes on the machine."""
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=256, d_model=64, n_layers=8, n_heads=4, glu_dim=128)
    model = apply_activation_checkpointing(cfg.build(), mode)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 256, (1, 2048))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).logsumexp(-1).mean()
    loss.backward()  # the checkpointed graph still runs
    return sum(seen.values())


def test_full_checkpointing_keeps_far_fewer_activations() -> None:
    none, full, selective = (_saved_activation_bytes(m) for m in ("none", "full", "selective"))
    assert none > 20 * 2**20, none  # 8 layers x 2048 tokens: tens of MiB without checkpointing
    assert full < 0.2 * none, (full, none)
    assert full < selective < none, (full, selective, none)
