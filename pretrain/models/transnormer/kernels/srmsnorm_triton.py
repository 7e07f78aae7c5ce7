"""Fused SRMSNorm ``y = x * rsqrt(mean(x^2) + eps)`` (no gain) as Triton kernels.

One program per row; the row is read once in the forward (which also stores the per-row
``r = rsqrt(mean(x^2) + eps)`` in fp32) and once more with ``dy`` in the backward::

    dx = r * dy - (r^3 / N) * x * sum(x * dy)

Arithmetic is fp32 whatever the storage dtype. This module imports Triton at import time:
import it lazily (the model does so only for CUDA tensors). Under ``TRITON_INTERPRET=1`` the
kernels also run on CPU tensors, in fp32, which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _srmsnorm_fwd(X, Y, R, stride, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(R + row, r)
    tl.store(Y + row * stride + cols, (x * r).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _srmsnorm_bwd(X, DY, DX, R, stride, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row)
    dot = tl.sum(x * dy, axis=0)
    dx = r * dy - (r * r * r / N) * dot * x
    tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


class SRMSNormFunction(torch.autograd.Function):
    """``(x, eps) -> x * rsqrt(mean(x^2, -1) + eps)`` over the last dimension."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, n = x2.shape
        y = torch.empty_like(x2)
        r = torch.empty(rows, device=x.device, dtype=torch.float32)
        block, warps = _launch_config(n)
        _srmsnorm_fwd[(rows,)](x2, y, r, x2.stride(0), n, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, r)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x2, r = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(rows, n).contiguous()
        dx = torch.empty_like(x2)
        block, warps = _launch_config(n)
        _srmsnorm_bwd[(rows,)](x2, dy2, dx, r, x2.stride(0), n, BLOCK=block, num_warps=warps)
        return dx.view(dy.shape), None


def srmsnorm_triton(x: Tensor, eps: float = 1e-6) -> Tensor:
    """SRMSNorm of ``x`` over its last dimension with the fused kernels.

    Args:
        x: Any shape ``(..., N)``, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        eps: Added to the mean square.

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    return SRMSNormFunction.apply(x, eps)
