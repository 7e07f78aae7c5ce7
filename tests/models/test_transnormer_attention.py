"""The block (Lightning Attention-2) and recurrent forms of decayed linear attention against
the masked quadratic reference, forward and backward, backend selection, and the decay schedule.

Inputs are fresh random tensors on every run (no fixed seed)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pretrain.models.transnormer import attention as attention_module
from pretrain.models.transnormer.attention import (
    linear_attention,
    linear_attention_naive,
    linear_attention_step,
    resolve_backend,
    slopes_for_layer,
)
from pretrain.models.transnormer.kernels.torch_la2 import _scan

B_, H_, D_, E_ = 2, 3, 8, 5  # batch, heads, q/k width, v width (e != d on purpose)


def _inputs(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    q = torch.randn(B_, H_, n, D_, dtype=dtype)
    k = torch.randn(B_, H_, n, D_, dtype=dtype)
    v = torch.randn(B_, H_, n, E_, dtype=dtype)
    # Heads with very different decays: fast, medium and almost none (the last-layer regime).
    slope = torch.tensor([0.5, 0.03, 1e-5])
    return q, k, v, slope


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Close relative to the tensor's scale (fp32 rounding over sums of many terms)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("block_size", [5, 16, 64])
@pytest.mark.parametrize("n", [1, 7, 64, 100, 257])
def test_block_form_matches_naive_forward_and_backward(n: int, block_size: int) -> None:
    q, k, v, slope = _inputs(n)
    grad_out = torch.randn(B_, H_, n, E_)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, slope, block_size=block_size)
    out.backward(grad_out)

    # Reference in fp64 so the comparison measures the fp32 block form's own error.
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_naive(*ref_leaves, slope.double())
    ref.backward(grad_out.double())

    assert out.dtype == torch.float32 and out.shape == (B_, H_, n, E_)
    _close(out, ref)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        _close(leaf.grad, ref_leaf.grad)


def test_naive_matches_explicit_sum() -> None:
    q, k, v, slope = _inputs(6, torch.float64)
    out = linear_attention_naive(q, k, v, slope.double())
    s, h = 4, 1
    expected = sum(
        (q[:, h, s] * k[:, h, t]).sum(-1, keepdim=True) * math.exp(-slope[h].item() * (s - t)) * v[:, h, t]
        for t in range(s + 1)
    )
    torch.testing.assert_close(out[:, h, s], expected)


@pytest.mark.parametrize("n", [1, 7, 100])
def test_recurrent_form_matches_naive_and_block_state(n: int) -> None:
    q, k, v, slope = _inputs(n)
    kv = torch.zeros(B_, H_, D_, E_)
    outs = []
    for t in range(n):
        o, kv = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], slope, kv)
        outs.append(o)
    assert kv.dtype == torch.float32
    ref = linear_attention_naive(q.double(), k.double(), v.double(), slope.double())
    _close(torch.stack(outs, dim=2), ref)

    _, block_kv = linear_attention(q, k, v, slope, block_size=16, return_state=True)
    _close(block_kv, kv)


@pytest.mark.parametrize("split", [0, 5, 16, 40])
def test_initial_state_continues_a_sequence(split: int) -> None:
    q, k, v, slope = _inputs(57)
    ref = linear_attention_naive(q.double(), k.double(), v.double(), slope.double())
    o1, kv1 = linear_attention(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], slope, block_size=16, return_state=True
    )
    o2 = linear_attention(
        q[:, :, split:], k[:, :, split:], v[:, :, split:], slope, block_size=16, initial_state=kv1
    )
    _close(torch.cat([o1, o2], dim=2), ref)


def test_low_precision_inputs_return_input_dtype() -> None:
    q, k, v, slope = _inputs(70)
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slope, block_size=16)
    assert out.dtype == torch.bfloat16
    ref = linear_attention_naive(
        q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), slope.double()
    )
    _close(out, ref, rtol=1e-2)


def _naive_state(k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``sum_t lambda^(n - 1 - t) k_t^T v_t`` by the recurrence, in fp64."""
    kv = torch.zeros(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=torch.float64)
    for t in range(k.shape[2]):
        kv = torch.exp(-slope.double())[:, None, None] * kv + k[:, :, t, :, None] * v[:, :, t, None, :]
    return kv


@pytest.mark.parametrize("n", [1, 50, 300])
def test_gradients_through_initial_and_final_state(n: int) -> None:
    """Prefill / context-parallel use: gradients flow into ``initial_state`` and out of the final state."""
    q, k, v, slope = _inputs(n)
    s0 = torch.randn(B_, H_, D_, E_)
    grad_out, grad_kv = torch.randn(B_, H_, n, E_), torch.randn(B_, H_, D_, E_)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    out, kv = linear_attention(*leaves[:3], slope, block_size=16, initial_state=leaves[3], return_state=True)
    ((out * grad_out).sum() + (kv * grad_kv).sum()).backward()

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, s0)]
    rq, rk, rv, rs0 = ref_leaves
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    decay = torch.exp(-slope.double()[:, None] * pos)[:, :, None]  # lambda^(p + 1)
    ref = linear_attention_naive(rq, rk, rv, slope.double()) + (rq * decay) @ rs0
    ref_kv = _naive_state(rk, rv, slope) + torch.exp(-slope.double() * n)[:, None, None] * rs0
    ((ref * grad_out.double()).sum() + (ref_kv * grad_kv.double()).sum()).backward()

    _close(out, ref)
    _close(kv, ref_kv)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        _close(leaf.grad, ref_leaf.grad)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nb", [1, 2, 7, 16, 17, 125])
def test_chunked_state_scan_matches_recurrence(nb: int, reverse: bool) -> None:
    feat = 6
    x = torch.randn(B_, H_, nb, feat, dtype=torch.float64)
    log_decay = -torch.tensor([0.5, 0.03, 1e-5], dtype=torch.float64) * 16
    init = torch.randn(B_, H_, feat, dtype=torch.float64)
    out = _scan(x.float(), log_decay.float(), reverse=reverse, init=init.float())
    state, expected = init.clone(), [torch.empty(0)] * nb
    for t in reversed(range(nb)) if reverse else range(nb):
        expected[t] = state.clone()
        state = log_decay.exp()[:, None] * state + x[:, :, t]
    _close(out, torch.stack(expected, dim=2))


def test_unknown_backend_names_valid_ones() -> None:
    q, k, v, slope = _inputs(4)
    with pytest.raises(ValueError, match="torch"):
        linear_attention(q, k, v, slope, backend="cuda-magic")


def test_auto_backend_is_torch_on_cpu_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    attention_module._auto_backend.cache_clear()
    q, k, v, slope = _inputs(9)
    with caplog.at_level(logging.INFO, logger=attention_module.__name__):
        out = linear_attention(q, k, v, slope, backend="auto")
        linear_attention(q, k, v, slope, backend="auto")
    assert resolve_backend("auto", q.device) == "torch"
    assert [r.getMessage() for r in caplog.records].count(
        "linear attention backend 'auto' on cpu tensors: using 'torch'"
    ) == 1
    torch.testing.assert_close(out, linear_attention(q, k, v, slope, backend="torch"))


def test_gpu_backends_on_cpu_say_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, slope = _inputs(4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_attention(q, k, v, slope, backend="lightning")
    monkeypatch.setattr(attention_module, "_importable", lambda module: module != "fla")
    with pytest.raises(RuntimeError, match="pip install fla-core"):
        linear_attention(q, k, v, slope, backend="fla")
    monkeypatch.setattr(attention_module, "_importable", lambda module: False)
    with pytest.raises(RuntimeError, match="pip install lightning-attn"):
        linear_attention(q, k, v, slope, backend="lightning")


@pytest.mark.parametrize("n_heads", [1, 2, 8, 32])
@pytest.mark.parametrize("n_layers", [2, 5, 24])
def test_slopes_power_of_two_heads(n_heads: int, n_layers: int) -> None:
    for i in range(n_layers):
        factor = 1 - i / (n_layers - 1) + 1e-5
        expected = torch.tensor([2 ** (-8 * j / n_heads) * factor for j in range(1, n_heads + 1)])
        torch.testing.assert_close(slopes_for_layer(n_heads, i, n_layers), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_heads", [3, 5, 6, 12, 20, 40])
def test_slopes_non_power_of_two_heads_follow_alibi(n_heads: int) -> None:
    slopes = slopes_for_layer(n_heads, 0, 4)
    assert slopes.shape == (n_heads,)
    assert (slopes > 0).all()
    assert len(set(slopes.tolist())) == n_heads
    closest = 2 ** math.floor(math.log2(n_heads))
    base = [2 ** (-8 * j / closest) for j in range(1, closest + 1)]
    extra = [2 ** (-8 * j / (2 * closest)) for j in range(1, 2 * closest + 1)][0::2][: n_heads - closest]
    expected = torch.tensor(base + extra) * (1 + 1e-5)
    torch.testing.assert_close(slopes, expected, rtol=1e-6, atol=0)


def test_slopes_single_layer_does_not_divide_by_zero() -> None:
    slopes = slopes_for_layer(4, 0, 1)
    torch.testing.assert_close(slopes, torch.tensor([2 ** (-2 * j) for j in range(1, 5)]) * (1 + 1e-5))
    with pytest.raises(ValueError):
        slopes_for_layer(4, 1, 1)


def test_config_attention_backend_reaches_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain.config import ConfigError
    from pretrain.models.transnormer import TransNormerConfig

    fields = {
        "vocab_size": 31,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "glu_dim": 24,
        "attention_block_size": 4,
    }
    assert TransNormerConfig(**fields).attention_backend == "auto"
    with pytest.raises((ConfigError, ValueError), match="attention_backend"):
        TransNormerConfig(**fields, attention_backend="cuda-magic")
    ids = torch.randint(0, 31, (2, 11))
    auto = TransNormerConfig(**fields).build()
    plain = TransNormerConfig(**fields, attention_backend="torch").build()
    plain.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto(ids), plain(ids))
    gpu_only = TransNormerConfig(**fields, attention_backend="lightning").build()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        gpu_only(ids)
