"""DeepSpeed ZeRO from our configs: the DeepSpeed config dict and the distributed hand-over.

``build_deepspeed_config`` maps the ``train`` and ``parallel`` sections onto DeepSpeed's JSON
config. What stays ours: the LR schedule (a torch ``LambdaLR`` handed to
``deepspeed.initialize``, so the curve is :func:`cosine_with_warmup` in every engine) and the loss
normalisation (see :mod:`parallel.engines.deepspeed`). What DeepSpeed owns: partitioning of
optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3), the AdamW update on those
partitions, the global gradient norm and clipping.

Optimizer choice:
  * without offload, ``torch.optim.AdamW`` (``"torch_adam": true``): no C++ op to compile, and the
    same update as the single-process :class:`~pretrain.trainer.train_module.TrainModule`;
  * with ``parallel.offload``, DeepSpeed insists on ``DeepSpeedCPUAdam``. Its C++ op is compiled on
    first use (about 40 s on a 2-core machine, cached afterwards under ``~/.cache/torch_extensions``).

``init_deepspeed_distributed`` wires DeepSpeed's comm layer onto the process group that is already
initialised (gloo on CPU) without building DeepSpeed's shared-memory comm op (a 26 s compile that
the gloo path does not need).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch

from parallel.config import ParallelConfig
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import resolve_device, resolve_dtype

_NEVER_PRINT = 2**31 - 1


def build_deepspeed_config(
    train_config: TrainConfig,
    parallel_config: ParallelConfig,
    *,
    dp_size: int,
    micro_batch_size: int,
    grad_accum: int,
    device: torch.device | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one run.

    Args:
        train_config: the ``train`` section (AdamW settings, clipping, precision).
        parallel_config: the ``parallel`` section (``zero_stage``, ``offload``).
        dp_size: data-parallel degree (the size of the group DeepSpeed partitions over).
        micro_batch_size: samples per forward/backward on one rank.
        grad_accum: micro-batches per optimizer step; ``train_batch_size`` is
            ``micro_batch_size * grad_accum * dp_size``, as DeepSpeed checks.
        device: where training runs (resolves ``precision: auto``); ``None`` resolves
            ``train_config.device``.
        overrides: DeepSpeed keys merged in last, recursively (e.g.
            ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``).

    Returns:
        A JSON-able dict for ``deepspeed.initialize(config=...)``. It has no ``scheduler``
        section: the schedule is passed as ``lr_scheduler``.

    Raises:
        ValueError: for sizes below 1, or a precision DeepSpeed cannot run on this device.
    """
    for name, value in (
        ("dp_size", dp_size),
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if device is None:
        device = resolve_device(train_config.device)
    dtype = resolve_dtype(train_config.precision, device)
    if dtype is torch.float16 and device.type == "cpu":  # not reachable from our configs; kept explicit
        raise ValueError("DeepSpeed refuses fp16 on CPU: set train.precision=bf16 or fp32")
    stage = parallel_config.zero_stage
    offload = parallel_config.offload
    if offload and stage == 0:
        raise ValueError("parallel.offload needs ZeRO: set parallel.zero_stage to 1, 2 or 3")

    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}

    adam: dict[str, Any] = {
        "lr": train_config.lr,
        "betas": list(train_config.betas),
        "eps": train_config.eps,
        "weight_decay": train_config.weight_decay,
    }
    if not offload:
        adam["torch_adam"] = True  # DeepSpeedCPUAdam (a C++ op) is required only by ZeRO-Offload

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": train_config.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype is torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if overrides:
        _merge(config, overrides)
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def init_deepspeed_distributed(backend: str | None = None) -> None:
    """Make DeepSpeed's comm layer use the already initialised ``torch.distributed`` group.

    Skips DeepSpeed's shared-memory comm op build (only a CPU intra-node fast path; compiling it
    costs ~26 s on first use). Must run after ``torch.distributed.init_process_group``.

    Args:
        backend: the backend name; ``None`` takes that of the default process group.

    Raises:
        RuntimeError: if no default process group is initialised.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "init_deepspeed_distributed: initialise torch.distributed first (e.g. via Topology)"
        )
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or dist.get_backend(), dist_init_required=False)
