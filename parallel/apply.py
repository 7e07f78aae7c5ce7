"""Turns a built plain model into the train module of the configured engine.

Order (fixed, as in torchtitan's ``parallelize``): process group -> topology -> tensor
parallelism (megatron engine) -> activation checkpointing -> the engine's train module (which
applies data parallelism / ZeRO). The trainer only sees the ``TrainModule`` interface.

| engine    | processes | what it runs                                                    |
|-----------|-----------|-----------------------------------------------------------------|
| native    | 1         | plain PyTorch (``TrainModule``)                                 |
| megatron  | any       | megatron-core tensor (+ sequence) x pipeline (1F1B) parallel,   |
|           |           | LASP context parallel (tp=1) x data parallel                    |
| deepspeed | any       | DeepSpeed ZeRO 0-3 (+ CPU offload) x data parallel              |

Pipeline (``pp``) and context (``cp``, LASP) parallelism run in the megatron engine only; the
megatron engine applies them itself (after tensor parallelism). Other layouts are refused up front.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cluster.env import ProcessEnv
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig
from pretrain.config import ConfigError
from pretrain.trainer.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class EngineSetup:
    """What the trainer needs from the layout: the train module and this rank's data slice."""

    train_module: Any
    dp_rank: int
    dp_size: int
    topology: Any = None


def check_layout(parallel: ParallelConfig, world_size: int) -> None:
    """Refuse, before any work, what no engine can run; say what to change."""
    try:
        parallel.dp_for(world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parallel.pp > 1 and parallel.engine != "megatron":
        raise ConfigError(
            f"parallel.pp > 1: pipeline parallelism runs in the megatron engine only (engine={parallel.engine}); "
            "set parallel.engine=megatron or parallel.pp=1"
        )
    if parallel.microbatches > 1:
        raise ConfigError(
            f"parallel.microbatches={parallel.microbatches}: the pipeline's micro-batches are the step's "
            "gradient-accumulation micro-batches; set train.grad_accum instead and leave parallel.microbatches=1"
        )
    if parallel.cp > 1:
        if parallel.engine != "megatron":
            raise ConfigError(
                f"parallel.cp > 1: LASP context parallelism runs in the megatron engine only "
                f"(engine={parallel.engine}); set parallel.engine=megatron or parallel.cp=1"
            )
        if parallel.tp > 1:
            raise ConfigError(
                "parallel.cp > 1 with parallel.tp > 1: LASP is not implemented for the tensor-parallel "
                "token mixer; set parallel.tp=1 or parallel.cp=1"
            )
    if parallel.engine == "native":
        if world_size > 1 or parallel.tp > 1 or parallel.zero_stage:
            raise ConfigError(
                f"parallel.engine=native runs one process without tp or ZeRO (world size {world_size}, "
                f"tp={parallel.tp}, zero_stage={parallel.zero_stage}): use parallel.engine=megatron for "
                "tensor/data parallelism or parallel.engine=deepspeed for ZeRO"
            )
    if parallel.engine == "megatron" and (parallel.zero_stage or parallel.offload):
        raise ConfigError("parallel.engine=megatron does not run ZeRO/offload: use parallel.engine=deepspeed")
    if parallel.engine == "deepspeed" and parallel.tp > 1:
        raise ConfigError(
            "parallel.engine=deepspeed runs data parallel ZeRO only: use parallel.engine=megatron for tp > 1"
        )
    if parallel.sequence_parallel and (parallel.engine != "megatron" or parallel.tp == 1):
        raise ConfigError("parallel.sequence_parallel needs parallel.engine=megatron and parallel.tp > 1")


def init_process_group(env: ProcessEnv) -> None:
    """Join the job's default group (torchrun/srun set RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)


def build_train_module(
    model: nn.Module,
    train: TrainConfig,
    parallel: ParallelConfig,
    device: torch.device,
    env: ProcessEnv,
    *,
    seq_len: int,
    model_config: Any,
) -> EngineSetup:
    """Apply the configured layout to ``model`` (built identically on every rank)."""
    check_layout(parallel, env.world_size)
    if parallel.engine == "native":
        from pretrain.trainer.train_module import TrainModule

        model = apply_activation_checkpointing(model, parallel.activation_checkpointing)
        return EngineSetup(TrainModule(model, train, device), 0, 1)

    init_process_group(env)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if parallel.engine == "megatron":
        from parallel.engines.megatron import MegatronTrainModule
        from parallel.tensor import apply_tensor_parallel
        from parallel.topology import Topology

        topo = Topology.from_config(parallel, env.world_size)
        topo.validate_for_model(model_config, seq_len=seq_len, sequence_parallel=parallel.sequence_parallel)
        if parallel.pp > 1 and getattr(model_config, "tie_word_embeddings", False):
            raise ConfigError(
                "parallel.pp > 1 with model.tie_word_embeddings=true is not supported (the shared matrix "
                "would live on the first and the last stage): set model.tie_word_embeddings=false or parallel.pp=1"
            )
        topo.build()
        model = apply_tensor_parallel(model, topo, sequence_parallel=parallel.sequence_parallel)
        model = apply_activation_checkpointing(model, parallel.activation_checkpointing)
        # context parallelism and the pipeline split are applied inside (after tensor parallelism)
        module = MegatronTrainModule(
            model,
            train,
            parallel,
            topo,
            device,
            sequence_parallel=parallel.sequence_parallel,
            virtual_stages=parallel.virtual_stages,
        )
        logger.info("megatron engine: %s", topo)
        return EngineSetup(module, topo.dp_rank, parallel.dp_for(env.world_size), topo)

    from parallel.engines.deepspeed import DeepSpeedTrainModule

    model = apply_activation_checkpointing(model, parallel.activation_checkpointing)
    module = DeepSpeedTrainModule(model, train, parallel, device)
    logger.info("deepspeed engine: ZeRO-%d over %d ranks", parallel.zero_stage, env.world_size)
    return EngineSetup(module, env.rank, env.world_size)
