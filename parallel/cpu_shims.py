"""CPU stand-ins for the few CUDA calls megatron-core 0.16.1 makes unconditionally.

megatron-core's tensor-parallel layers run on CPU/gloo, but some code paths allocate on
``torch.cuda.current_device()`` or use the CUDA RNG, and assert "Torch not compiled with CUDA
enabled" without a GPU. :func:`apply_cpu_shims` maps exactly those calls to their CPU
equivalents, only when ``torch.cuda.is_available()`` is false, and only inside the megatron
modules listed below (``torch`` itself is not patched). It is idempotent.

What is shimmed, and why:

* ``torch.cuda.current_device()`` -> ``torch.device("cpu")`` inside
  ``megatron.core.tensor_parallel.{mappings,layers,utils}`` and ``megatron.core.utils``:
  sequence parallelism's all-gather / reduce-scatter outputs and the global memory buffer
  (``GlobalMemoryBuffer.get_tensor``) are allocated there. ``torch.cuda.synchronize()`` is a
  no-op there too.
* The CUDA RNG of ``megatron.core.tensor_parallel.random`` (``model_parallel_cuda_manual_seed``,
  ``get_cuda_rng_tracker().fork()``, megatron's activation checkpoint) becomes the CPU default
  generator: ``torch.cuda.{get_rng_state,set_rng_state,manual_seed}`` and the module's
  ``_get_cuda_rng_state/_set_cuda_rng_state`` map to ``torch.{get,set}_rng_state/manual_seed``.
  The tracker's check that the *CPU* RNG did not move inside a fork is meaningless when the
  forked generator *is* the CPU one; its log line is filtered out.

* Pipeline schedules (``megatron.core.pipeline_parallel``): ``p2p_communication`` allocates
  its shape messages and receive buffers on ``torch.cuda.current_device()`` and calls
  ``torch.cuda.synchronize()`` (both redirected as above); ``schedules`` counts tokens in
  ``torch.zeros(..., device="cuda")``, which inside that module allocates on CPU instead.

Not shimmed (not used by this platform's megatron engine yet; each asserts on CPU):
``dist_checkpointing.save`` (``torch.cuda.synchronize``), megatron's optimizer with grad
clipping and its bf16 optimizer.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

_DEVICE_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
)
"""megatron modules whose ``torch.cuda.current_device()`` allocations are redirected to CPU."""

_SCHEDULES_MODULE = "megatron.core.pipeline_parallel.schedules"
"""megatron module whose ``device="cuda"`` tensor literals are redirected to CPU."""

_RNG_MODULE = "megatron.core.tensor_parallel.random"

_CPU_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside a shimmed module: CPU answers for the calls below,
    everything else is the real ``torch.cuda`` (which still raises where CUDA is needed)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch:
    """Stands in for the ``torch`` module inside a shimmed megatron module: only ``.cuda`` differs."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_device(device: Any) -> Any:
    """``"cuda"`` (or a CUDA device) -> CPU; anything else unchanged."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorchSchedules(_CpuTorch):
    """``torch`` inside megatron's schedules: tensor factories given ``device="cuda"`` allocate on CPU."""

    @staticmethod
    def zeros(*size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*size, device=_cpu_device(device), **kwargs)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _CPU_RNG_WARNING not in record.getMessage()


def shims_applied() -> bool:
    """Whether :func:`apply_cpu_shims` has patched megatron in this process."""
    mod = importlib.import_module(_RNG_MODULE)
    return isinstance(mod.torch, _CpuTorch)


def apply_cpu_shims() -> bool:
    """Map megatron-core's unconditional CUDA calls to CPU, if and only if CUDA is absent.

    Safe to call any number of times (and from every rank). Call it before megatron's
    tensor-parallel layers or RNG tracker are used.

    Returns:
        True if the shims are in place after the call, False when CUDA is available (nothing done).
    """
    if torch.cuda.is_available():
        return False
    if shims_applied():
        return True
    for name in _DEVICE_MODULES:
        importlib.import_module(name).torch = _CpuTorch()
    importlib.import_module(_SCHEDULES_MODULE).torch = _CpuTorchSchedules()
    rng = importlib.import_module(_RNG_MODULE)
    rng._get_cuda_rng_state = _cpu_get_rng_state
    rng._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(_RNG_MODULE).addFilter(_DropCpuRngWarning())
    rng.torch = _CpuTorch()  # last: marks the shims as applied (see shims_applied)
    return True
