"""The block (Lightning Attention-2) and recurrent forms of decayed linear attention against
the masked quadratic reference, forward and backward, and the decay schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models.transnormer.attention import (
    linear_attention,
    linear_attention_naive,
    linear_attention_step,
    slopes_for_layer,
)

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


@pytest.mark.parametrize("block_size", [16, 64])
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


def test_unknown_backend_names_valid_ones() -> None:
    q, k, v, slope = _inputs(4)
    with pytest.raises(ValueError, match="torch"):
        linear_attention(q, k, v, slope, backend="cuda-magic")


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
