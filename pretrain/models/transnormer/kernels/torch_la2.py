"""Lightning Attention-2 in plain PyTorch with a hand-written backward (the CPU / fallback backend).

Computes ``o_s = sum_{t <= s} (q_s . k_t) lambda^(s - t) v_t`` with ``lambda = exp(-slope)``
per head, block by block. With blocks of ``B`` tokens, in-block positions ``j = 1..B`` and
``S_t`` the fp32 state before block ``t``::

    O_t     = [(Q_t K_t^T) * D] V_t + (lambda^j * Q_t) S_t        D[a, c] = lambda^(a - c), a >= c
    S_{t+1} = lambda^B S_t + (lambda^(B - j) * K_t)^T V_t

Every per-block product is one batched matmul over all blocks at once; only the state
recurrence runs across blocks, and it is evaluated in chunks (:func:`_scan`) so that it costs a
few batched operations instead of one small operation per block.

The backward pass is written out: with ``dO`` the output gradient,

* intra-block: ``dP = (dO_t V_t^T) * D``, ``dQ = dP K_t``, ``dK = dP^T Q_t``,
  ``dV = ((Q_t K_t^T) * D)^T dO_t``;
* inter-block: ``dQ += lambda^j * (dO_t S_t^T)``; the gradient reaching the state before block
  ``t`` directly is ``(lambda^j * Q_t)^T dO_t``, and a *reverse* scan turns these into ``G_t``,
  the gradient of block ``t``'s state increment; then ``dK += lambda^(B - j) * (V_t G_t^T)`` and
  ``dV += (lambda^(B - j) * K_t) G_t``.

Saved for the backward: the fp32 inputs and the per-block states ``S_t`` (``n d e / B`` values
per head: the size of one input when ``B = d``). Recomputing the states instead would add one
of the 13 batched matmuls of a forward+backward (about 8% of its FLOPs at ``B = d``) plus a
scan, for the same O(n) memory order, so they are kept. The intra-block scores ``Q K^T * D``
(``n B`` per head) are recomputed rather than saved.

Everything is computed in fp32 and returned in the input dtype. A sequence whose length is not
a multiple of ``B`` is padded with zeros at the *front*: zero keys and values add nothing to
later outputs or to the state, so outputs and final state are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BLOCK_SIZE = 64
"""Block size ``B`` of the torch backend, chosen by measurement.

Forward+backward at n=8192, b=1, H=4, d=e=64, fp32 on the 2-core AMD EPYC (Zen 4) development
machine, 1 thread, median of 5, process CPU time in seconds (three runs each; the machine was
shared, so CPU time was steadier than wall time)::

    B=16: 0.242-0.243   B=32: 0.125-0.132   B=64: 0.101-0.115   B=128: 0.105-0.121   B=256: 0.215-0.228

Small blocks lose to small-matmul overhead and a longer state scan, large ones to the intra-block
work, which grows with ``B``. ``bench/bench_attention.py --block-sizes`` repeats the sweep.
"""


def _decays(slope: Tensor, block: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decay factors for one block, per head.

    Returns:
        ``D (H, 1, B, B)`` intra-block mask, ``q_decay = lambda^j`` and
        ``k_decay = lambda^(B - j)`` as ``(H, 1, B, 1)``, and ``log(lambda^B) = -slope B`` as ``(H,)``.
    """
    s = slope.to(device=device, dtype=torch.float32)[:, None]
    j = torch.arange(1, block + 1, device=device, dtype=torch.float32)
    diff = j[:, None] - j[None, :]
    mask = torch.exp(-s[:, :, None] * diff.clamp(min=0)) * (diff >= 0)
    q_decay = torch.exp(-s * j)[:, None, :, None]
    k_decay = torch.exp(-s * (block - j))[:, None, :, None]
    return mask[:, None], q_decay, k_decay, -s[:, 0] * block


def _blocks(x: Tensor, block: int, pad: int) -> Tensor:
    """``(b, H, n, f)`` -> contiguous fp32 ``(b, H, nb, B, f)``, zero-padded at the front."""
    x = x.to(torch.float32)
    x = F.pad(x, (0, 0, pad, 0)) if pad else x.contiguous()
    b, H, n, f = x.shape
    return x.view(b, H, n // block, block, f)


def _chunk(nb: int) -> int:
    """Chunk length for :func:`_scan`: a divisor of ``nb`` near ``sqrt(nb)`` if there is one
    (no padding, no copies), else ``isqrt(nb)``."""
    root = math.isqrt(nb)
    divisors = [c for c in range(max(1, root // 2), 2 * root + 1) if nb % c == 0]
    return min(divisors, key=lambda c: abs(c - root)) if divisors else max(1, root)


def _scan(x: Tensor, log_decay: Tensor, reverse: bool = False, init: Tensor | None = None) -> Tensor:
    """Exclusive decayed scan over the block axis of ``x`` ``(b, H, nb, F)``.

    Forward: ``out_t = sum_{u < t} decay^(t - 1 - u) x_u + decay^t init``.
    Reverse: ``out_t = sum_{u > t} decay^(u - 1 - t) x_u + decay^(nb - 1 - t) init``.

    The blocks are grouped into chunks of ``C ~ sqrt(nb)``; inside a chunk the scan is one
    batched matmul with a ``(C + 1, C)`` decay matrix (the last row gives the chunk's total),
    and only the ``nb / C`` chunk carries are accumulated one after the other. All powers of
    ``decay`` have non-negative exponents, so nothing can overflow.

    Args:
        x: Values ``(b, H, nb, F)`` in fp32.
        log_decay: Per-head ``log(decay)`` per step ``(H,)``, ``<= 0``.
        reverse: Scan from the last block towards the first.
        init: Optional carry ``(b, H, F)`` entering the scan (zeros if ``None``).

    Returns:
        ``(b, H, nb, F)`` fp32.
    """
    b, H, nb, feat = x.shape
    C = _chunk(nb)
    nc = -(-nb // C)
    p = nc * C - nb
    if p:
        x = F.pad(x, (0, 0, p, 0) if reverse else (0, 0, 0, p))
    i = torch.arange(C + 1, device=x.device, dtype=torch.float32)[:, None]
    u = torch.arange(C, device=x.device, dtype=torch.float32)[None, :]
    # Forward row i < C: decay^(i - 1 - u) for u < i; row C: decay^(C - 1 - u) (chunk total).
    # Reverse row i < C: decay^(u - 1 - i) for u > i; row C: decay^u.
    expo = (u - 1 - i) if reverse else (i - 1 - u)
    expo[C] = u[0] if reverse else C - 1 - u[0]
    logd = log_decay.to(torch.float32)[:, None, None]  # (H, 1, 1)
    mat = torch.where(expo >= 0, torch.exp(logd * expo.clamp(min=0)), 0.0)  # (H, C + 1, C)
    local = torch.matmul(mat[:, None], x.view(b, H, nc, C, feat))  # (b, H, nc, C + 1, F)
    # Carries: state entering each chunk (in scan order).
    carry = x.new_zeros(b, H, nc, feat) if init is None else init[:, :, None].expand(b, H, nc, feat).clone()
    step = torch.exp(logd[:, :, 0] * C)  # (H, 1)
    order = range(nc - 1, 0, -1) if reverse else range(nc - 1)
    for c in order:
        nxt = c - 1 if reverse else c + 1
        torch.addcmul(local[:, :, c, C], carry[:, :, c], step, out=carry[:, :, nxt])
    # out = local + decay^(i) * carry   (reverse: decay^(C - 1 - i))
    w = torch.arange(C, device=x.device, dtype=torch.float32)
    w = torch.exp(logd[:, :, 0] * (C - 1 - w if reverse else w))[:, None, :, None]  # (H, 1, C, 1)
    out = torch.addcmul(local[:, :, :, :C], w, carry[:, :, :, None])
    out = out.view(b, H, nc * C, feat)
    return out[:, :, p:] if reverse else out[:, :, :nb]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[-2:])


def _bmm(a: Tensor, c: Tensor) -> Tensor:
    """Batched matmul of ``(..., m, k) @ (..., k, n)`` flattened to one batch dimension."""
    return torch.bmm(_flat(a), _flat(c)).view(*a.shape[:-1], c.shape[-1])


def _add_bmm_(out: Tensor, a: Tensor, c: Tensor) -> None:
    """``out += a @ c`` in place (``out`` contiguous), batched like :func:`_bmm`."""
    _flat(out).baddbmm_(_flat(a), _flat(c))


class LightningAttentionTorch(torch.autograd.Function):
    """``(q, k, v, slope, block) -> (o, final state)``; see the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        b, H, n, d = q.shape
        e = v.shape[-1]
        B = min(block, n)
        pad = (-n) % B
        qb, kb, vb = (_blocks(x, B, pad) for x in (q, k, v))
        D, q_decay, k_decay, log_lam_b = _decays(slope, B, q.device)

        o = _bmm(_bmm(qb, kb.transpose(-1, -2)).mul_(D), vb)  # intra-block
        kv_blocks = _bmm((kb * k_decay).transpose(-1, -2), vb)  # (b, H, nb, d, e)
        nb = kv_blocks.shape[2]
        states = _scan(kv_blocks.view(b, H, nb, d * e), log_lam_b).view(b, H, nb, d, e)
        _add_bmm_(o, qb * q_decay, states)  # inter-block
        final = torch.addcmul(kv_blocks[:, :, -1], states[:, :, -1], log_lam_b.exp()[:, None, None])

        ctx.save_for_backward(qb, kb, vb, slope, states)
        ctx.shape = (n, B, pad, q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        return o.view(b, H, -1, e)[:, :, pad:].to(q.dtype), final

    @staticmethod
    def backward(ctx, grad_o: Tensor | None, grad_state: Tensor | None):  # type: ignore[override]
        qb, kb, vb, slope, states = ctx.saved_tensors
        n, B, pad, q_dtype, k_dtype, v_dtype = ctx.shape
        b, H, nb, _, d = qb.shape
        e = vb.shape[-1]
        D, q_decay, k_decay, log_lam_b = _decays(slope, B, qb.device)
        if grad_o is None:
            grad_o = vb.new_zeros(b, H, n, e)
        do = _blocks(grad_o, B, pad)

        # Intra-block part.
        dp = _bmm(do, vb.transpose(-1, -2)).mul_(D)
        dq = _bmm(dp, kb)
        dk = _bmm(dp.transpose(-1, -2), qb)
        del dp
        p = _bmm(qb, kb.transpose(-1, -2)).mul_(D)
        dv = _bmm(p.transpose(-1, -2), do)
        del p

        # Inter-block part: dQ from the saved states, then the reverse scan of dKV.
        do_decay = do * q_decay
        _add_bmm_(dq, do_decay, states.transpose(-1, -2))
        direct = _bmm(qb.transpose(-1, -2), do_decay)  # gradient reaching S_t from block t
        init = None if grad_state is None else grad_state.to(torch.float32).reshape(b, H, d * e)
        g = _scan(direct.view(b, H, nb, d * e), log_lam_b, reverse=True, init=init).view(b, H, nb, d, e)
        _add_bmm_(dk, vb * k_decay, g.transpose(-1, -2))
        _add_bmm_(dv, kb * k_decay, g)

        def unblock(x: Tensor, dtype: torch.dtype) -> Tensor:
            return x.view(b, H, nb * B, -1)[:, :, pad:].to(dtype)

        return unblock(dq, q_dtype), unblock(dk, k_dtype), unblock(dv, v_dtype), None, None


def lightning_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """Block-wise decayed linear attention from a zero state, with the hand-written backward.

    Args:
        q: Queries ``(b, H, n, d)``, ``n >= 1``.
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``.
        block_size: Block size ``B`` (capped at ``n``).

    Returns:
        ``(o, kv)``: ``o`` ``(b, H, n, e)`` in the dtype of ``q`` and the fp32 state after the
        last token ``(b, H, d, e)``; both differentiable.
    """
    return LightningAttentionTorch.apply(q, k, v, slope, block_size)
