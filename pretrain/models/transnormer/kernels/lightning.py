"""The TransNormerLLM authors' Lightning Attention-2 Triton kernels (PyPI ``lightning-attn``).

``lightning_attn.ops.triton.lightning_attn2.LightningAttention2`` computes, per head ``h``,
``o_s = sum_{t <= s} (q_s . k_t) exp(-s_h (s - t)) v_t`` with the slopes ``s`` given as an fp32
``(H, 1, 1)`` tensor: the same convention as our ``slope`` (positive rates, decay
``exp(-slope)``, no scaling of ``q``), so our slopes are passed unchanged. It starts from a zero
state and returns the output only.

Kernel constraints handled here, since the package's own ``lightning_attn_func`` handles only
some of them (and asserts on head dims that divide 16):

* ``tl.arange`` over the feature dims needs powers of two, and ``tl.dot`` needs at least 16:
  ``d`` and ``e`` are zero-padded to ``max(16, next_power_of_2)``. Zero features change neither
  ``q . k`` nor the kept output columns.
* Head dims above 128 are split into 128-wide slices whose outputs add up (``q . k`` is a sum
  over features), as the authors do for large heads (e.g. LRPE's doubled ``2h``).
* Any sequence length works: the kernels mask rows ``>= n``.

Triton runs these kernels on CPU tensors under ``TRITON_INTERPRET=1`` (fp32 only: bf16
arithmetic is wrong there), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_HEAD_SLICE = 128
"""Widest q/k slice passed to one kernel call."""


def _padded_width(width: int) -> int:
    return max(16, 1 << (width - 1).bit_length())


def lightning_attention_triton(q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
    """Decayed causal linear attention from a zero state with the ``lightning-attn`` kernels.

    Args:
        q: Queries ``(b, H, n, d)`` on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        k: Keys ``(b, H, n, d)``.
        v: Values ``(b, H, n, e)``.
        slope: Positive decay rates ``(H,)``.

    Returns:
        ``(b, H, n, e)`` in the dtype of ``q``; differentiable in ``q``, ``k`` and ``v``.

    Raises:
        ImportError: If ``lightning-attn`` (and Triton) are not installed.
    """
    from lightning_attn.ops.triton.lightning_attn2 import LightningAttention2

    d, e = q.shape[-1], v.shape[-1]
    e_pad = _padded_width(e)
    if e_pad != e:
        v = F.pad(v, (0, e_pad - e))
    s = slope.to(device=q.device, dtype=torch.float32).reshape(-1, 1, 1).contiguous()
    out: Tensor | None = None
    for start in range(0, d, MAX_HEAD_SLICE):
        qs, ks = q[..., start : start + MAX_HEAD_SLICE], k[..., start : start + MAX_HEAD_SLICE]
        w = qs.shape[-1]
        w_pad = _padded_width(w)
        if w_pad != w:
            qs, ks = F.pad(qs, (0, w_pad - w)), F.pad(ks, (0, w_pad - w))
        o = LightningAttention2.apply(qs, ks, v, s)
        out = o if out is None else out + o.float()
    assert out is not None
    return out[..., :e].to(q.dtype)
