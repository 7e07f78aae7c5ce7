"""flash-linear-attention (PyPI ``fla-core``) kernels for decayed linear attention.

``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=..., scale=..., initial_state=...,
output_final_state=...)`` takes ``(B, T, H, K)`` tensors and a per-head *log* decay
``g_gamma`` of shape ``(H,)``. TransNormerLLM's decay ``exp(-slope)`` is therefore
``g_gamma = -slope``, and ``scale=1.0`` (its default is ``1 / sqrt(K)``). Do not use fla's
``lightning_attn`` op for this model: it builds its own, different, slope schedule.

The kernels need a GPU: they do not run under Triton's CPU interpreter (autotuning needs a
driver), so they are checked against the torch backend only by the GPU tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    return_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Decayed causal linear attention with fla's ``chunk_simple_gla``.

    Args:
        q: Queries ``(b, H, n, d)`` on a CUDA device.
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``.
        initial_state: Optional fp32 state ``(b, H, d, e)`` of earlier tokens.
        return_state: Also return the state after the last token.

    Returns:
        ``(o (b, H, n, e), final state (b, H, d, e) or None)``.

    Raises:
        ImportError: If ``fla-core`` is not installed.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    g_gamma = -slope.to(device=q.device, dtype=torch.float32)
    # (b, H, n, d) -> (b, n, H, d); for the model's q/k/v (views of a (b, n, H, d) projection)
    # this transpose makes them contiguous again without a copy.
    o, state = chunk_simple_gla(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        g_gamma=g_gamma,
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=return_state,
    )
    return o.transpose(1, 2), (state.float() if state is not None else None)
