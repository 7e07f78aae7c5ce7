"""LASP context parallelism against the single-process model: logits, gradients, 10 AdamW steps.

Every comparison is fp32 on gloo (plus a bf16 run of the LASP function). The reference runs in
the test process on the full sequences; the workers each hold a contiguous slice of them
(cp = 2 and cp = 4).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel.context import (
    all_reduce_gradients,
    apply_context_parallel,
    context_parallel_loss,
    lasp_attention,
    split_batch_for_cp,
)
from pretrain.data.loader import Batch
from pretrain.models.transnormer.attention import linear_attention
from pretrain.models.transnormer.config import TransNormerConfig
from pretrain.trainer.train_module import token_loss
from tests._dist import run_distributed

# LRPE in layer 0 checks global positions; 3 layers give 3 distinct decay schedules.
CONFIG = dict(
    vocab_size=64, d_model=32, n_layers=3, n_heads=4, glu_dim=48, lrpe_layers=[0], attention_block_size=8
)
STEPS = 10
LR, BETAS, WD, EPS, CLIP = 3e-3, (0.9, 0.95), 0.1, 1e-8, 1.0


def _build(state: dict[str, torch.Tensor]) -> nn.Module:
    model = TransNormerConfig(**CONFIG).build()
    model.load_state_dict(state)
    return model


def _batches(n: int, seq_len: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CONFIG["vocab_size"], (2, seq_len + 1), generator=g)
        mask = (torch.rand(2, seq_len, generator=g) > 0.2).float()
        out.append(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask))
    return out


def _train(
    model: nn.Module,
    batches: list[Batch],
    loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor],
    reduce: Callable[[nn.Module], None],
) -> list[float]:
    """The train module's recipe: AdamW with decay on matrices only, clipping at 1.0."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    losses = []
    for batch in batches:
        loss = loss_fn(model(batch.tokens), batch)
        loss.backward()
        reduce(model)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _mean_loss(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    return token_loss(logits, b.labels, b.loss_mask) / b.loss_mask.sum()


def _by_value(obj: object) -> object:
    """Tensors -> numpy arrays: a tensor put on the harness's queue travels through shared memory
    that can vanish when the worker exits before the parent reads it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().numpy().copy()
    if isinstance(obj, dict):
        return {k: _by_value(v) for k, v in obj.items()}
    return obj


def _as_tensors(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _as_tensors(v) for k, v in obj.items()}
    return obj


def _lasp_function(rank: int, world_size: int, kernel: dict) -> dict:
    """``lasp_attention`` on this rank's slice of raw kernel inputs, through a loss that also uses
    the last rank's final state (so its gradient path is exercised too)."""
    m = kernel["q"].shape[2] // world_size
    sl = slice(rank * m, (rank + 1) * m)
    q, k, v = (kernel[x][:, :, sl].clone().requires_grad_() for x in "qkv")
    o, kv = lasp_attention(q, k, v, kernel["slope"], None, block_size=4)
    loss = (o * kernel["go"][:, :, sl]).sum() + ((kv * kernel["gkv"]).sum() if rank == world_size - 1 else 0)
    loss.backward()
    out = {"o": o, "kv": kv, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    # bf16 inputs (as under autocast): the state stays fp32, outputs and gradients come back in bf16.
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    ob, kvb = lasp_attention(qb, kb, vb, kernel["slope"], None, block_size=4)
    (ob.float() * kernel["go"][:, :, sl]).sum().backward()
    assert ob.dtype == qb.grad.dtype == torch.bfloat16 and kvb.dtype == torch.float32
    out["o_bf16"] = ob.float()
    return out


def _cp_worker(
    rank: int,
    world_size: int,
    state: dict,
    batches: list[Batch],
    train: bool,
    checkpointing: str,
    kernel: dict,
) -> dict:
    from parallel.activation_checkpoint import apply_activation_checkpointing

    out = {"kernel": _lasp_function(rank, world_size, kernel)}
    group = dist.new_group(list(range(world_size)))  # a real subgroup, as the topology hands out
    model = apply_context_parallel(_build(state), group)
    apply_activation_checkpointing(model, checkpointing)
    local = [split_batch_for_cp(b, rank, world_size) for b in batches]

    def loss_fn(logits: torch.Tensor, b: Batch) -> torch.Tensor:
        return context_parallel_loss(logits, b.labels, b.loss_mask, group)

    logits = model(local[0].tokens)
    loss = loss_fn(logits, local[0])
    loss.backward()
    all_reduce_gradients(model, group)
    out["logits"] = logits.detach()
    out["loss"] = loss.item()
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if train:
        out["losses"] = _train(model, local, loss_fn, lambda m: all_reduce_gradients(m, group))
    return _by_value(out)


def _reference(state: dict, batches: list[Batch]) -> dict:
    model = _build(state)
    logits = model(batches[0].tokens)
    loss = _mean_loss(logits, batches[0])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return {
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": grads,
        "losses": _train(model, batches, _mean_loss, lambda m: None),
    }


def _kernel_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    b, H, n, d, e = 2, 2, 12, 3, 5
    shapes = {
        "q": (b, H, n, d),
        "k": (b, H, n, d),
        "v": (b, H, n, e),
        "go": (b, H, n, e),
        "gkv": (b, H, d, e),
    }
    out = {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    out["slope"] = torch.tensor([0.3, 0.05])
    return out


def _check_kernel(results: list[dict], kernel: dict) -> None:
    """Per-rank ``lasp_attention`` outputs and input gradients against the whole-sequence kernel."""
    q, k, v = (kernel[x].clone().requires_grad_() for x in "qkv")
    o, kv = linear_attention(q, k, v, kernel["slope"], block_size=4, return_state=True)
    ((o * kernel["go"]).sum() + (kv * kernel["gkv"]).sum()).backward()
    res = [r["kernel"] for r in results]
    torch.testing.assert_close(torch.cat([r["o"] for r in res], 2), o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res[-1]["kv"], kv.detach(), rtol=1e-5, atol=1e-5)
    o_bf16 = torch.cat([r["o_bf16"] for r in res], 2)
    assert _rel(o_bf16, o.detach()) < 3e-2
    for key, ref in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        torch.testing.assert_close(torch.cat([r[key] for r in res], 2), ref, rtol=1e-5, atol=1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(results: list[dict], ref: dict, train: bool) -> None:
    results = [_as_tensors(r) for r in results]
    _check_kernel(results, _kernel_inputs())
    logits = torch.cat([r["logits"] for r in results], dim=1)
    assert logits.shape == ref["logits"].shape
    assert _rel(logits, ref["logits"]) < 1e-5
    for r in results:
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert _rel(r["grads"][name], g) < 1e-5, name
    if train:
        for r in results:
            for step, (a, b) in enumerate(zip(r["losses"], ref["losses"], strict=True)):
                assert abs(a - b) / abs(b) < 1e-5, (step, a, b)
        assert ref["losses"][-1] < ref["losses"][0]  # it did train


@pytest.fixture(scope="module")
def init_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TransNormerConfig(**CONFIG).build().state_dict()


def test_cp2_matches_single_process_logits_grads_and_training(init_state: dict) -> None:
    batches = _batches(STEPS, seq_len=64)
    ref = _reference(init_state, batches)
    _check(
        run_distributed(_cp_worker, 2, init_state, batches, True, "none", _kernel_inputs()), ref, train=True
    )


def test_cp4_uneven_blocks_with_full_activation_checkpointing(init_state: dict) -> None:
    # 12 tokens per rank with 8-token blocks: chunks do not align with the kernel's blocks, and
    # the recomputation in the backward repeats the state exchange.
    batches = _batches(1, seq_len=48, seed=1)
    ref = _reference(init_state, batches)
    _check(
        run_distributed(_cp_worker, 4, init_state, batches, False, "full", _kernel_inputs()), ref, train=False
    )


def test_split_batch_for_cp_slices_contiguously_and_validates() -> None:
    (batch,) = _batches(1, seq_len=8)
    parts = [split_batch_for_cp(batch, r, 4) for r in range(4)]
    for name in ("tokens", "labels", "loss_mask"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts], dim=1), getattr(batch, name))
    assert parts[1].tokens.shape == (2, 2)
    with pytest.raises(ValueError, match=r"divisible by parallel\.cp=3"):
        split_batch_for_cp(batch, 0, 3)
    with pytest.raises(ValueError, match="cp_rank"):
        split_batch_for_cp(batch, 4, 4)
