"""Decayed causal linear attention: the TransNormerLLM token-mixing kernel and its decay schedule.

Three forms of the same function, all computing

    o_s = sum_{t <= s} (q_s . k_t) * lambda^(s - t) * v_t,    lambda = exp(-slope) per head,

with no ``1/sqrt(d)`` scaling of ``q``:

* :func:`linear_attention_naive` - the masked quadratic reference ``((Q K^T) * M) V``.
* :func:`linear_attention` - the block-wise Lightning Attention-2 form used for training and
  prefill: exact intra-block attention plus an fp32 running ``KV`` state across blocks.
* :func:`linear_attention_step` - the recurrent form for one token (constant-memory decoding).

Shapes: ``q, k`` are ``(b, H, n, d)``, ``v`` is ``(b, H, n, e)``, ``slope`` is ``(H,)`` and the
state ``kv`` is ``(b, H, d, e)`` in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BACKENDS = ("torch",)
"""Valid values of ``linear_attention(..., backend=...)``."""


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes: ``2 ** (-8 j / n)`` for ``j = 1..n`` when ``n`` is a power of two;
    otherwise the slopes of the largest power of two below ``n`` followed by every other slope
    of the next power of two."""
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * j / n) for j in range(1, n + 1)]
    closest = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def slopes_for_layer(n_heads: int, layer_idx: int, n_layers: int) -> Tensor:
    """Per-head decay rates of one layer, compatible with the released TransNormerLLM checkpoints.

    ``slope[j] = alibi_slope[j] * (1 - layer_idx / (n_layers - 1) + 1e-5)``; the decay is
    ``lambda = exp(-slope)``. The first layer decays fastest and the last layer barely decays
    (factor ``1e-5``). With a single layer the ``1 - i / (L - 1)`` term is undefined (the
    released code divides by zero); we use the first-layer value, i.e. a factor ``1 + 1e-5``.

    Args:
        n_heads: Number of heads ``H``; any positive integer (non powers of two use the ALiBi rule).
        layer_idx: 0-based index of the layer.
        n_layers: Number of layers ``L``.

    Returns:
        An fp32 tensor of shape ``(n_heads,)`` with positive entries.

    Raises:
        ValueError: If the arguments are out of range.
    """
    if n_heads < 1 or n_layers < 1 or not 0 <= layer_idx < n_layers:
        raise ValueError(
            f"need n_heads >= 1 and 0 <= layer_idx < n_layers, got {n_heads=}, {layer_idx=}, {n_layers=}"
        )
    factor = 1.0 + 1e-5 if n_layers == 1 else 1.0 - layer_idx / (n_layers - 1) + 1e-5
    return torch.tensor([s * factor for s in _alibi_slopes(n_heads)], dtype=torch.float32)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (b, H, n, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (b, H, n, e) matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    if slope.shape != (q.shape[1],):
        raise ValueError(f"slope must have shape (H,) = ({q.shape[1]},); got {tuple(slope.shape)}")


def linear_attention_naive(q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
    """Reference form ``((Q K^T) * M) V`` with ``M[s, t] = exp(-slope (s - t))`` for ``t <= s``.

    Quadratic in the sequence length; for tests only. Computed in fp32 (or fp64 if given fp64).

    Args:
        q: Queries ``(b, H, n, d)``.
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``.

    Returns:
        ``(b, H, n, e)`` in the dtype of ``q``.
    """
    _check_shapes(q, k, v, slope)
    ct = torch.promote_types(q.dtype, torch.float32)
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    diff = pos[:, None] - pos[None, :]
    mask = torch.exp(-slope.to(ct)[:, None, None] * diff.clamp(min=0).to(ct)) * (diff >= 0)
    scores = q.to(ct) @ k.to(ct).transpose(-1, -2) * mask
    return (scores @ v.to(ct)).to(q.dtype)


def linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, kv: Tensor
) -> tuple[Tensor, Tensor]:
    """Recurrent form for one token: ``kv' = exp(-slope) kv + k^T v``, ``o = q kv'``.

    Per-token cost and memory do not depend on the context length. The state stays in fp32.

    Args:
        q: Query of the new token ``(b, H, d)``.
        k: Key of the new token ``(b, H, d)``.
        v: Value of the new token ``(b, H, e)``.
        slope: Positive decay rates ``(H,)``.
        kv: State after the previous tokens ``(b, H, d, e)``, fp32 (zeros for an empty context).

    Returns:
        ``(o, kv')``: the output ``(b, H, e)`` in the dtype of ``q`` and the new fp32 state.
    """
    decay = torch.exp(-slope.float())[None, :, None, None]
    kv = decay * kv.float() + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    o = (q.float().unsqueeze(-2) @ kv).squeeze(-2)
    return o.to(q.dtype), kv


def _linear_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block_size: int, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Lightning Attention-2 in plain PyTorch; returns ``(o fp32, final kv fp32)``.

    The sequence is padded with zeros at the *front* to a multiple of the block size: zero keys
    and values add nothing to later outputs or to the state, so the final state is exact.
    """
    b, H, n, d = q.shape
    e = v.shape[-1]
    B = min(block_size, n)
    pad = (-n) % B
    q, k, v = (x.float() for x in (q, k, v))
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, pad, 0)) for x in (q, k, v))
    nb = (n + pad) // B
    q = q.view(b, H, nb, B, d)
    k = k.view(b, H, nb, B, d)
    v = v.view(b, H, nb, B, e)
    s = slope.float().to(q.device)[:, None]  # (H, 1)

    # Decay masks, built once per call. j = 1..B is the 1-based position inside a block.
    j = torch.arange(1, B + 1, device=q.device, dtype=torch.float32)
    diff = j[:, None] - j[None, :]
    intra = torch.exp(-s[:, :, None] * diff.clamp(min=0)) * (diff >= 0)  # (H, B, B)
    q_decay = torch.exp(-s * j)[:, None, :, None]  # (H, 1, B, 1): lambda^j
    k_decay = torch.exp(-s * (B - j))[:, None, :, None]  # (H, 1, B, 1): lambda^(B - j)
    block_decay = torch.exp(-s * B)[:, :, None]  # (H, 1, 1): lambda^B

    # Intra-block: exact masked attention inside each block, all blocks in one batched matmul.
    o = ((q @ k.transpose(-1, -2)) * intra[:, None]) @ v
    # Each block's contribution to the running state, then a (short) scan over blocks.
    kv_blocks = (k * k_decay).transpose(-1, -2) @ v  # (b, H, nb, d, e)
    kv = q.new_zeros(b, H, d, e)
    states = []
    for t in range(nb):
        states.append(kv)
        kv = block_decay * kv + kv_blocks[:, :, t]
    # Inter-block: (Q_t * lambda^j) @ KV_{before t}.
    o = o + (q * q_decay) @ torch.stack(states, dim=2)
    o = o.view(b, H, nb * B, e)[:, :, pad:]

    if initial_state is not None:
        # A state carried in from earlier tokens reaches position p (0-based) decayed by lambda^(p+1).
        s0 = initial_state.float()
        pos = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
        o = o + (q.view(b, H, -1, d)[:, :, pad:] * torch.exp(-s * pos)[:, :, None]) @ s0
        kv = kv + torch.exp(-s * n)[:, :, None] * s0
    return o, kv


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    *,
    backend: str = "torch",
    block_size: int = 64,
    initial_state: Tensor | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal decayed linear attention, block-wise (Lightning Attention-2).

    For blocks of ``B`` tokens with in-block positions ``j = 1..B`` and a running fp32 state::

        O_t = [(Q_t K_t^T) * D] V_t + (Q_t * lambda^j) KV       D[a, c] = lambda^(a - c), a >= c
        KV  = lambda^B KV + (K_t * lambda^(B - j))^T V_t

    Cost ``O(n B d + n d e)``, memory ``O(n)``. Any ``n >= 1`` works (not only multiples of ``B``)
    and ``e`` may differ from ``d``. Computed in fp32, returned in the input dtype. The backward
    pass is autograd through the block form.

    Args:
        q: Queries ``(b, H, n, d)`` (not scaled).
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``; the decay per step is ``exp(-slope)``.
        backend: Implementation; one of :data:`BACKENDS`.
        block_size: Block size ``B``.
        initial_state: Optional fp32 state ``(b, H, d, e)`` of earlier tokens (e.g. a previous chunk).
        return_state: Also return the fp32 state after the last token, for decoding to continue.

    Returns:
        ``o`` of shape ``(b, H, n, e)``, or ``(o, kv)`` with ``kv`` ``(b, H, d, e)`` fp32 when
        ``return_state`` is set.

    Raises:
        ValueError: On an unknown backend, a non-positive block size or mismatched shapes.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown linear attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    _check_shapes(q, k, v, slope)
    b, H, n, d = q.shape
    if initial_state is not None and initial_state.shape != (b, H, d, v.shape[-1]):
        raise ValueError(
            f"initial_state must be (b, H, d, e) = {(b, H, d, v.shape[-1])}; got {tuple(initial_state.shape)}"
        )
    if n == 0:
        o = v.new_zeros(v.shape)
        kv = (
            initial_state.float()
            if initial_state is not None
            else q.new_zeros(b, H, d, v.shape[-1], dtype=torch.float32)
        )
    else:
        o, kv = _linear_attention_torch(q, k, v, slope, block_size, initial_state)
        o = o.to(q.dtype)
    return (o, kv) if return_state else o
