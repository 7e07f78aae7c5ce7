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


# -- full weights out of an engine -------------------------------------------------------------


def named_unique_params(model: torch.nn.Module) -> list[tuple[list[str], torch.nn.Parameter]]:
    """Each parameter once, with every name it has (tied weights have several), in module order."""
    by_id: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    return list(by_id.values())


def full_fp32_state_dict(
    model: torch.nn.Module, stage0_masters: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every parameter full and in fp32, on the CPU, under any ZeRO
    stage: the fp32 master where DeepSpeed keeps one (ZeRO-1/2/3, or ``stage0_masters`` of the
    bf16 ZeRO-0 optimizer, keyed by ``id(param)``), else the (gathered) parameter itself (ZeRO-0
    fp32, frozen parameters). A collective under ZeRO: every rank calls it, in the same order."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    masters = stage0_masters or {}
    full: dict[str, torch.Tensor] = {}
    for names, p in named_unique_params(model):
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:
            value = masters.get(id(p))
        if value is None:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                value = p.detach().float().clone()
        value = value.detach().cpu().clone()
        for name in names:
            full[name] = value
    return {
        key: full[key] if key in full else value.detach().cpu().clone()
        for key, value in model.state_dict().items()
    }


# -- the optimizer state in the single-process layout ------------------------------------------
#
# "Canonical" = what ``torch.optim.AdamW(groups).state_dict()`` of the single-process
# TrainModule holds: ``param_groups`` (decay >= 2-D params first, then no-decay; hyperparameters
# plus ``params`` as int indices in that order) and ``state[index] = {"step", "exp_avg",
# "exp_avg_sq"}`` with full, unpartitioned tensors. ZeRO-1/2/3 keep these moments as flat fp32
# partitions (one per param group and dp rank); the functions below move between the two.

_MOMENTS = ("exp_avg", "exp_avg_sq")


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed's (ZeRO or mixed-precision) wrapper steps."""
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _hyper_groups(optimizer: Any, n_groups: int) -> list[dict[str, Any]]:
    """The live param-group dicts whose hyperparameters (lr, betas, ...) mirror our groups."""
    groups = base_optimizer(optimizer).param_groups
    if len(groups) != n_groups:
        raise RuntimeError(f"DeepSpeed optimizer has {len(groups)} param groups, expected {n_groups}")
    return groups


def _current_step(base: torch.optim.Optimizer) -> float | None:
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps) if steps else None


def _full_moment(optimizer: Any, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(param, key)  # a collective over the dp group
    if value is None:
        raise RuntimeError(
            f"no DeepSpeed optimizer state {key!r} for a parameter of shape {tuple(param.shape)}"
        )
    return value.detach().float().cpu().clone().view(_full_shape(param))


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def gather_adamw_state(
    optimizer: Any, groups: list[list[torch.nn.Parameter]], zero_stage: int
) -> dict[str, Any]:
    """The canonical AdamW ``state_dict`` of a DeepSpeed optimizer, full on every rank.

    A collective over the dp group under ZeRO-1/2/3 (every rank must call it, same order).

    Args:
        optimizer: ``deepspeed.initialize``'s optimizer (torch AdamW, DeepSpeed's mixed-precision
            wrapper, or a ZeRO optimizer).
        groups: the model parameters in the param groups given to ``deepspeed.initialize``.
        zero_stage: the ZeRO stage.

    Returns:
        ``{"state", "param_groups"}`` as ``torch.optim.AdamW.state_dict()`` of the single-process
        module would hold it (tensors on CPU).
    """
    base = base_optimizer(optimizer)
    hyper = _hyper_groups(optimizer, len(groups))
    if zero_stage == 0:  # torch AdamW on the parameters (or their fp32 masters): already per-parameter
        for live, params in zip(hyper, groups, strict=True):
            if len(live["params"]) != len(params):
                raise RuntimeError("ZeRO-0 optimizer groups do not match the model's param groups")
        return _cpu(base.state_dict())
    step = _current_step(base)
    state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    index = 0
    for live, params in zip(hyper, groups, strict=True):
        ids = []
        for p in params:
            if step is not None:
                entry: dict[str, torch.Tensor] = {"step": torch.tensor(step, dtype=torch.float32)}
                for key in _MOMENTS:
                    entry[key] = _full_moment(optimizer, p, key)
                state[index] = entry
            ids.append(index)
            index += 1
        group = {k: _cpu(v) for k, v in live.items() if k != "params"}
        group["params"] = ids
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


def scatter_adamw_state(
    optimizer: Any, groups: list[list[torch.nn.Parameter]], zero_stage: int, state_dict: dict[str, Any]
) -> None:
    """Load a canonical AdamW ``state_dict`` (see :func:`gather_adamw_state`) into a DeepSpeed
    optimizer of any ZeRO stage and dp size: each rank keeps its own slice of the moments.

    Raises:
        ValueError: if the param groups or tensor shapes do not match the model's.
    """
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g) for g in groups]:
        raise ValueError(
            "optimizer state does not match the model: param group sizes "
            f"{[len(g['params']) for g in saved_groups]} vs {[len(g) for g in groups]}"
        )
    flat = [p for params in groups for p in params]
    saved_state = {int(k): v for k, v in state_dict["state"].items()}
    for group, params in zip(saved_groups, groups, strict=True):
        for i, p in zip(group["params"], params, strict=True):
            for key in _MOMENTS:
                if i in saved_state and tuple(saved_state[i][key].shape) != tuple(_full_shape(p)):
                    raise ValueError(
                        f"optimizer state {key} of param {i} has shape {tuple(saved_state[i][key].shape)}, "
                        f"the model's is {tuple(_full_shape(p))}"
                    )
    base = base_optimizer(optimizer)
    if zero_stage == 0:  # a copy: torch keeps same-dtype tensors, and AdamW updates them in place
        base.load_state_dict(_cpu(state_dict))
        return
    for live, saved in zip(_hyper_groups(optimizer, len(groups)), saved_groups, strict=True):
        live.update({k: v for k, v in saved.items() if k != "params"})
    if not saved_state:  # saved before the first step: a fresh optimizer
        base.state.clear()
        _relink(optimizer)
        return
    order = [i for g in saved_groups for i in g["params"]]
    step = max(float(entry["step"]) for entry in saved_state.values())
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    for part in _flat_partitions(optimizer):  # AdamW creates its state lazily, at the first step
        entry = base.state[part]
        # torch Adam/AdamW keep a float tensor, DeepSpeedCPUAdam (ZeRO-Offload) a Python int
        entry["step"] = torch.tensor(step, dtype=torch.float32) if torch_adam else int(step)
        for key in _MOMENTS:
            if key not in entry:
                entry[key] = torch.zeros_like(part, memory_format=torch.preserve_format)
    _relink(optimizer)
    for i, p in zip(order, flat, strict=True):
        for key in _MOMENTS:  # a parameter without state (never had a gradient) gets zeros
            value = saved_state[i][key] if i in saved_state else torch.zeros(_full_shape(p))
            _set_moment(optimizer, p, value, key)


def _flat_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, the keys of the torch optimizer's state."""
    for name in (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "fp32_groups_flat_partition",
    ):
        parts = getattr(optimizer, name, None)
        if parts is not None:
            return list(parts)
    raise RuntimeError(f"unsupported DeepSpeed optimizer {type(optimizer).__name__}: no flat fp32 partitions")


def _relink(optimizer: Any) -> None:
    """ZeRO-1/2 (and the bf16 optimizer) view each parameter's fragment of the flat state once it
    exists; re-point those views at the state tensors present now."""
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _set_moment(optimizer: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's slice of the (padded) flat parameter
        part, _ = optimizer._get_fp32_opt_state_partition(
            param, release_swap_buffers=False, optim_state_key=key
        )
        rank, n = optimizer._get_param_partition_rank(param), part.numel()
        chunk = value.reshape(-1)[rank * n : (rank + 1) * n]
        part[: chunk.numel()].copy_(chunk.to(part.dtype))
        return
    safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)


def _cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor detached, cloned and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
