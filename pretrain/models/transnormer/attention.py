"""Decayed causal linear attention: the TransNormerLLM token-mixing kernel and its decay schedule.

Three forms of the same function, all computing

    o_s = sum_{t <= s} (q_s . k_t) * lambda^(s - t) * v_t,    lambda = exp(-slope) per head,

with no ``1/sqrt(d)`` scaling of ``q``:

* :func:`linear_attention_naive` - the masked quadratic reference ``((Q K^T) * M) V``.
* :func:`linear_attention` - the block-wise Lightning Attention-2 form used for training and
  prefill: exact intra-block attention plus an fp32 running ``KV`` state across blocks, on one
  of several backends (plain PyTorch, or Triton kernels on GPUs; see :func:`resolve_backend`).
* :func:`linear_attention_step` - the recurrent form for one token (constant-memory decoding).

Shapes: ``q, k`` are ``(b, H, n, d)``, ``v`` is ``(b, H, n, e)``, ``slope`` is ``(H,)`` and the
state ``kv`` is ``(b, H, d, e)`` in fp32.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os

import torch
from torch import Tensor

from pretrain.models.transnormer.kernels.torch_la2 import DEFAULT_BLOCK_SIZE, lightning_attention_torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "lightning", "fla")
"""Valid values of ``linear_attention(..., backend=...)``."""

_GPU_BACKENDS = {
    "lightning": ("lightning_attn", "lightning-attn==0.0.5 triton (or tnl-platform[kernels])"),
    "fla": ("fla", "fla-core triton (a release whose chunk_simple_gla takes g_gamma)"),
}
"""GPU backend -> (module to import, what to pip install)."""


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


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _auto_backend(device_type: str) -> str:
    """The backend ``"auto"`` resolves to on a device type; logged once per device type."""
    if device_type == "cuda" and _importable("lightning_attn") and _importable("triton"):
        choice = "lightning"
    elif device_type == "cuda" and _importable("fla"):
        choice = "fla"
    else:
        choice = "torch"
    logger.info("linear attention backend 'auto' on %s tensors: using %r", device_type, choice)
    return choice


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that ``linear_attention(..., backend=backend)`` runs on ``device``.

    ``"auto"``: on CUDA ``"lightning"`` if ``lightning-attn`` is importable, else ``"fla"`` if
    ``fla-core`` is, else ``"torch"``; on any other device always ``"torch"``.

    Args:
        backend: One of :data:`BACKENDS`.
        device: Device of the inputs.

    Returns:
        ``"torch"``, ``"lightning"`` or ``"fla"``.

    Raises:
        ValueError: On an unknown backend name.
        RuntimeError: If an explicitly requested GPU backend is not installed or cannot run on
            ``device``.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown linear attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}"
        )
    if backend == "auto":
        return _auto_backend(device.type)
    if backend == "torch":
        return backend
    package, install = _GPU_BACKENDS[backend]
    if not (_importable(package) and _importable("triton")):
        raise RuntimeError(
            f"linear attention backend {backend!r} needs the {package!r} package: pip install {install}"
        )
    interpreted = backend == "lightning" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"linear attention backend {backend!r} runs Triton GPU kernels and needs CUDA tensors, "
            f"got {device.type}; use backend='torch' or 'auto'"
        )
    return backend


def _final_state(k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
    """State after the last token from a zero start: ``sum_t lambda^(n - 1 - t) k_t^T v_t`` (fp32)."""
    n = k.shape[2]
    age = torch.arange(n - 1, -1, -1, device=k.device, dtype=torch.float32)
    weight = torch.exp(-slope.float().to(k.device)[:, None] * age)[:, :, None]  # (H, n, 1)
    return (k.float() * weight).transpose(-1, -2) @ v.float()


def _continue_from(
    o: Tensor, kv: Tensor | None, q: Tensor, slope: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Add the contribution of a state carried in from earlier tokens.

    It reaches position ``p`` (0-based) decayed by ``lambda^(p + 1)`` and the final state by
    ``lambda^n``. Plain differentiable torch ops.
    """
    n = q.shape[2]
    s = slope.float().to(q.device)[:, None]
    pos = torch.arange(1, n + 1, device=q.device, dtype=torch.float32)
    s0 = initial_state.float()
    o = (o.float() + (q.float() * torch.exp(-s * pos)[:, :, None]) @ s0).to(o.dtype)
    if kv is not None:
        kv = kv + torch.exp(-s * n)[:, :, None] * s0
    return o, kv


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    *,
    backend: str = "torch",
    block_size: int = DEFAULT_BLOCK_SIZE,
    initial_state: Tensor | None = None,
    return_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal decayed linear attention, block-wise (Lightning Attention-2).

    For blocks of ``B`` tokens with in-block positions ``j = 1..B`` and a running fp32 state::

        O_t = [(Q_t K_t^T) * D] V_t + (Q_t * lambda^j) KV       D[a, c] = lambda^(a - c), a >= c
        KV  = lambda^B KV + (K_t * lambda^(B - j))^T V_t

    Cost ``O(n B d + n d e)``, memory ``O(n)``. Any ``n >= 1`` works (not only multiples of ``B``)
    and ``e`` may differ from ``d``. Forward and backward agree with
    :func:`linear_attention_naive` to fp32 rounding.

    Backends (see :func:`resolve_backend`): ``"torch"`` (plain PyTorch with a hand-written
    backward, any device, computed in fp32), ``"lightning"`` (the authors' Triton kernels,
    ``lightning-attn``), ``"fla"`` (``fla-core``'s ``chunk_simple_gla``), ``"auto"``.

    Args:
        q: Queries ``(b, H, n, d)`` (not scaled).
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``; the decay per step is ``exp(-slope)``.
        backend: Implementation; one of :data:`BACKENDS`.
        block_size: Block size ``B`` of the torch backend (the Triton kernels use their own).
        initial_state: Optional fp32 state ``(b, H, d, e)`` of earlier tokens (e.g. a previous chunk).
        return_state: Also return the fp32 state after the last token, for decoding to continue.

    Returns:
        ``o`` of shape ``(b, H, n, e)`` in the dtype of ``q``, or ``(o, kv)`` with ``kv``
        ``(b, H, d, e)`` fp32 when ``return_state`` is set.

    Raises:
        ValueError: On an unknown backend, a non-positive block size or mismatched shapes.
        RuntimeError: If the requested GPU backend is not installed or the tensors are not on CUDA.
    """
    name = resolve_backend(backend, q.device)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    _check_shapes(q, k, v, slope)
    b, H, n, d = q.shape
    e = v.shape[-1]
    if initial_state is not None and initial_state.shape != (b, H, d, e):
        raise ValueError(
            f"initial_state must be (b, H, d, e) = {(b, H, d, e)}; got {tuple(initial_state.shape)}"
        )
    if n == 0:
        kv = (
            initial_state.float()
            if initial_state is not None
            else q.new_zeros(b, H, d, e, dtype=torch.float32)
        )
        return (v.new_zeros(v.shape), kv) if return_state else v.new_zeros(v.shape)

    kv: Tensor | None
    if name == "fla":
        from pretrain.models.transnormer.kernels.fla import fla_attention

        o, kv = fla_attention(q, k, v, slope, initial_state, return_state)
    else:
        if name == "lightning":
            from pretrain.models.transnormer.kernels.lightning import lightning_attention_triton

            o = lightning_attention_triton(q, k, v, slope)
            kv = _final_state(k, v, slope) if return_state else None
        else:
            o, kv = lightning_attention_torch(q, k, v, slope, block_size)
        if initial_state is not None:
            o, kv = _continue_from(o, kv, q, slope, initial_state)
    return (o, kv) if return_state else o
