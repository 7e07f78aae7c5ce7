"""Kernels for TransNormerLLM's token mixer and norms.

* :mod:`.torch_la2` - Lightning Attention-2 in plain PyTorch with a hand-written backward
  (CPU, and the fallback everywhere).
* :mod:`.lightning` - the authors' Triton kernels (``lightning-attn``), for CUDA.
* :mod:`.fla` - flash-linear-attention's ``chunk_simple_gla`` (``fla-core``), for CUDA.
* :mod:`.srmsnorm_triton` - fused SRMSNorm forward/backward in Triton, for CUDA.

The Triton modules import Triton when they are imported; import them lazily, only for CUDA
tensors (or under ``TRITON_INTERPRET=1`` in tests).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False
