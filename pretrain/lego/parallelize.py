"""How one Lego-MT phase steps: on one process, data parallel under DeepSpeed ZeRO 0-3, or
tensor x data parallel with megatron-core's parallel linears.

The localized trainer builds the resident model (shared parts + one group's branches) and picks
the trainable parameters of the stage; :func:`build_phase_step` then hands them to

* :class:`LocalStep`: plain PyTorch AdamW in one process (``parallel.engine=native``);
* :class:`DeepSpeedStep`: a DeepSpeed engine over all processes (``parallel.engine=deepspeed``,
  ``parallel.zero_stage`` 0-3, optional CPU offload), the same machinery and the same
  optimizer-state layout as the TransNormerLLM trainer's DeepSpeed engine
  (:mod:`parallel.engines.deepspeed`, :mod:`parallel.zero`);
* :class:`TensorParallelStep`: ``parallel.engine=megatron`` with ``parallel.tp`` ranks sharing
  each block (:mod:`pretrain.lego.tensor_parallel`) and ``world / tp`` data-parallel replicas,
  gradients summed over the replicas and the global norm clipped across the TP shards
  (:mod:`parallel.tensor`), as the TransNormerLLM megatron engine does.

**Loss normalisation.** The step's loss is the sum over the selected flows of each flow's mean
next-token loss over the non-pad labels of the *global* batch. Every flow sees the same labels,
so that is ``sum_flows(token_loss_sum) / N`` with ``N`` the global label count, which every rank
knows from the global batch (no collective needed). Rank ``r`` of ``dp`` takes rows
``[r*b/dp, (r+1)*b/dp)`` of the padded global batch and backpropagates its token-loss sum
``/ N * dp``; DeepSpeed's gradient average over ranks cancels the ``* dp``, so gradients, clipping
and updates equal the single-process step's. The tensor-parallel step backpropagates ``/ N`` and
sums the gradients over its replicas instead.

All three keep the optimizer state in one layout: ``torch.optim.AdamW([params]).state_dict()`` of the
single process, so a phase checkpoint resumes under any engine, ZeRO stage, tp and dp size. A layer
that layerdrop skipped gets a zero gradient in every engine (DeepSpeed's flat gradient buffers
hold zeros for it), so it still takes AdamW's momentum step, as it does under ZeRO.

Pipeline, context and Megatron sequence parallelism are not applied to Lego-MT (refused by
:func:`check_lego_layout`): a branch's blocks split over tp ranks, and sentence pairs are short. ``parallel.
activation_checkpointing`` recomputes every encoder/decoder layer (``full``) or only the
feed-forward blocks, whose ReLU activations are the widest (``selective``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.topology import Topology
from pretrain.config import ConfigError
from pretrain.models.lego_mt import LegoMT, flow_names

CHECKPOINTED_MODULES = {
    "full": ("EncoderLayer", "DecoderLayer"),
    "selective": ("FeedForward", "TensorParallelFeedForward"),
}
"""Lego-MT module types recomputed in the backward per ``parallel.activation_checkpointing``."""

ADAM_BETAS = (0.9, 0.98)
"""AdamW betas of every phase (fairseq's translation default)."""


@dataclass(frozen=True)
class StepSettings:
    """What a phase's step needs besides the model and its trainable parameters."""

    weight_decay: float
    grad_clip: float
    batch_size: int
    """Pairs per step over all ranks."""
    device: torch.device
    precision: str = "fp32"
    """``fp32`` or ``bf16``."""


def check_lego_layout(
    parallel: ParallelConfig, world_size: int, *, device: str = "cpu", precision: str = "fp32"
) -> None:
    """Refuse, before any work, a layout the Lego-MT trainer cannot run; say what to change."""
    if parallel.pp != 1 or parallel.cp != 1 or parallel.sequence_parallel:
        raise ConfigError(
            f"Lego-MT runs tensor and data parallel (pp={parallel.pp}, cp={parallel.cp}, "
            f"sequence_parallel={parallel.sequence_parallel}): set parallel.pp=cp=1 and "
            "parallel.sequence_parallel=false"
        )
    if parallel.engine == "native" and (
        world_size > 1 or parallel.tp > 1 or parallel.zero_stage or parallel.offload
    ):
        raise ConfigError(
            f"parallel.engine=native runs one process without tp or ZeRO (world size {world_size}, "
            f"tp={parallel.tp}, zero_stage={parallel.zero_stage}): set parallel.engine=megatron for "
            "tensor parallelism or parallel.engine=deepspeed for data parallelism and ZeRO"
        )
    if parallel.engine == "deepspeed" and parallel.tp > 1:
        raise ConfigError(
            "parallel.engine=deepspeed runs data parallel ZeRO only: use parallel.engine=megatron for tp > 1"
        )
    if parallel.engine == "megatron":
        if parallel.zero_stage or parallel.offload:
            raise ConfigError(
                "parallel.engine=megatron does not run ZeRO/offload: use parallel.engine=deepspeed"
            )
        if world_size % parallel.tp:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp={parallel.tp}: change the "
                "number of processes or parallel.tp"
            )
        if precision == "bf16" and device == "cpu":
            raise ConfigError(
                "parallel.engine=megatron on CPU runs fp32 only (megatron-core's parallel linears bind "
                "their autocast handling to CUDA): set train.precision=fp32"
            )


def flow_token_losses(out: dict[str, Any], labels: Tensor, flows: int, pad_id: int) -> dict[str, Tensor]:
    """``{flow: summed next-token loss over the non-pad labels}`` from the model's logits, in fp32."""
    return {
        name: F.cross_entropy(
            out[name]["logits"].float().flatten(0, 1), labels.flatten(), ignore_index=pad_id, reduction="sum"
        )
        for name in flow_names(flows)
    }


class PhaseStep(Protocol):
    """One phase's optimizer steps and the full (single-process layout) state they produce."""

    model: LegoMT

    def step(
        self, batch: tuple[Tensor, Tensor, Tensor], *, flows: int, group: str, lr: float
    ) -> dict[str, float]:
        """One optimizer step on the global ``(src, tgt_in, labels)``; returns ``loss`` and
        ``loss_<flow>`` (global means) as floats, identical on every rank."""
        ...

    def module_state(self, module: nn.Module) -> dict[str, Tensor]:
        """``module.state_dict()`` with full fp32 tensors on the CPU (a collective under ZeRO)."""
        ...

    def optimizer_state(self) -> dict[str, Any]:
        """The single-process AdamW ``state_dict`` (a collective under ZeRO)."""
        ...

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state` returned, under any engine/ZeRO stage/dp size."""
        ...

    def close(self) -> None:
        """Free what the phase's engine holds before the next phase builds its own."""
        ...


def _global_tokens(labels: Tensor, pad_id: int) -> int:
    return max(int((labels != pad_id).sum()), 1)


class LocalStep:
    """AdamW on the trainable parameters, one process."""

    def __init__(self, model: LegoMT, params: list[nn.Parameter], settings: StepSettings) -> None:
        self.model = model
        self.params = params
        self.grad_clip = settings.grad_clip
        self.bf16 = settings.precision == "bf16"  # autocast; weights, gradients and AdamW stay fp32
        self.optimizer = torch.optim.AdamW(
            params, lr=0.0, betas=ADAM_BETAS, weight_decay=settings.weight_decay
        )

    def step(
        self, batch: tuple[Tensor, Tensor, Tensor], *, flows: int, group: str, lr: float
    ) -> dict[str, float]:
        device = self.model.embed.tokens.weight.device
        pad = self.model.cfg.pad_id
        n = _global_tokens(batch[2], pad)
        src, tgt_in, labels = (t.to(device) for t in self._rows(batch))
        for pg in self.optimizer.param_groups:
            pg["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(src, tgt_in, flows, group)
        sums = flow_token_losses(out, labels, flows, pad)
        local = sum(sums.values())
        (local / n).backward()
        for p in self.params:  # layerdrop-skipped layers: zeros, as in DeepSpeed's flat buffers
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._sync_grads()
        if self.grad_clip > 0:
            self._clip_grads()
        self.optimizer.step()
        reduced = self._sum_over_replicas(torch.stack([local.detach(), *(v.detach() for v in sums.values())]))
        metrics = {f"loss_{k}": float(v) / n for k, v in zip(sums, reduced[1:].tolist())}
        metrics["loss"] = float(reduced[0]) / n
        return metrics

    # What a data-parallel subclass changes: its rows of the batch, the gradient sum over the
    # replicas, the norm over shards, the loss sums over the replicas.
    def _rows(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        return batch

    def _sync_grads(self) -> None:
        pass

    def _clip_grads(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)

    def _sum_over_replicas(self, t: Tensor) -> Tensor:
        return t

    def module_state(self, module: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        pass


class DeepSpeedStep:
    """The resident model inside a DeepSpeed engine; the optimizer holds only ``params``.

    In bf16 DeepSpeed computes with bf16 weights against fp32 masters (those are what is saved).

    Under ZeRO-3 the tied output projection reads the embedding matrix outside the embedding's
    own ``forward``, so it is registered as an external parameter of the whole model (gathered
    for the model's forward and backward).
    """

    def __init__(
        self, model: LegoMT, params: list[nn.Parameter], settings: StepSettings, parallel: ParallelConfig
    ) -> None:
        import deepspeed

        from parallel.zero import build_deepspeed_config, init_deepspeed_distributed
        from pretrain.trainer.config import TrainConfig

        init_deepspeed_distributed()
        self.dp_size = dist.get_world_size()
        self.dp_rank = dist.get_rank()
        if settings.batch_size % self.dp_size:
            raise ConfigError(
                f"train.batch_size={settings.batch_size} must be divisible by the {self.dp_size} data-parallel processes"
            )
        self.rows = settings.batch_size // self.dp_size
        self.zero_stage = parallel.zero_stage
        self.device = settings.device
        adamw = TrainConfig(
            lr=1.0,
            betas=ADAM_BETAS,
            weight_decay=settings.weight_decay,
            grad_clip=settings.grad_clip,
            precision=settings.precision,
        )
        ds_config = build_deepspeed_config(
            adamw,
            parallel,
            dp_size=self.dp_size,
            micro_batch_size=self.rows,
            grad_accum=1,
            device=self.device,
        )
        if self.zero_stage == 3:
            deepspeed.zero.register_external_parameter(model, model.embed.tokens.weight)
        self.params = params
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.device),
            model_parameters=[{"params": params, "weight_decay": settings.weight_decay}],
            config=ds_config,
            dist_init_required=False,
        )
        self.model: LegoMT = self.engine.module
        # ZeRO-0 in bf16 keeps the fp32 masters in DeepSpeed's unfused optimizer.
        self._stage0_masters: dict[int, Tensor] = {}
        if self.zero_stage == 0 and hasattr(self.optimizer, "fp32_groups"):
            for low, high in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups, strict=True):
                self._stage0_masters.update({id(p): m for p, m in zip(low, high, strict=True)})

    def step(
        self, batch: tuple[Tensor, Tensor, Tensor], *, flows: int, group: str, lr: float
    ) -> dict[str, float]:
        from parallel.zero import base_optimizer

        for pg in base_optimizer(self.optimizer).param_groups:
            pg["lr"] = lr
        pad = self.model.cfg.pad_id
        n = _global_tokens(batch[2], pad)
        rows = slice(self.dp_rank * self.rows, (self.dp_rank + 1) * self.rows)
        src, tgt_in, labels = (t[rows].to(self.device) for t in batch)
        self.engine.train()
        if self.zero_stage == 3:
            self._clear_stale_grad_partitions()
        sums = flow_token_losses(self.engine(src, tgt_in, flows, group), labels, flows, pad)
        local = sum(sums.values())
        self.engine.backward(local / n * self.dp_size, scale_wrt_gas=False)
        self.engine.step()
        reduced = torch.stack([local.detach(), *(v.detach() for v in sums.values())]).cpu()
        dist.all_reduce(reduced)
        metrics = {f"loss_{k}": float(v) / n for k, v in zip(sums, reduced[1:].tolist())}
        metrics["loss"] = float(reduced[0]) / n
        return metrics

    def _clear_stale_grad_partitions(self) -> None:
        """ZeRO-3 writes a parameter's gradient partition only when the parameter took part in the
        backward, so a layer that layerdrop skipped would step on its previous step's gradient.
        Zero the flat buffer first: a skipped layer then sees a zero gradient, as in ZeRO-0/1/2."""
        flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()

    def module_state(self, module: nn.Module) -> dict[str, Tensor]:
        from parallel.zero import full_fp32_state_dict

        return full_fp32_state_dict(module, self._stage0_masters)

    def optimizer_state(self) -> dict[str, Any]:
        from parallel.zero import gather_adamw_state

        return gather_adamw_state(self.optimizer, [self.params], self.zero_stage)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from parallel.zero import scatter_adamw_state

        scatter_adamw_state(self.optimizer, [self.params], self.zero_stage, state)
        steps = max((int(float(s["step"])) for s in state["state"].values()), default=0)
        self.engine.global_steps = steps
        self.engine.global_samples = steps * self.engine.train_batch_size()
        self.engine.micro_steps = steps

    def close(self) -> None:
        """Free the engine's partitions before the next phase builds its own."""
        self.engine.destroy()


class TensorParallelStep(LocalStep):
    """AdamW on this rank's shards of the trainable parameters: ``parallel.tp`` ranks share each
    block, ``world / tp`` replicas split the batch.

    Built from the dense resident model (the same weights on every rank); each rank keeps its
    shard. The optimizer holds the parameters in the order of the dense ``params``, so its state
    maps one to one onto the one-process AdamW's.
    """

    def __init__(
        self, model: LegoMT, params: list[nn.Parameter], settings: StepSettings, topo: Topology
    ) -> None:
        from pretrain.lego.tensor_parallel import apply_lego_tensor_parallel

        if settings.batch_size % topo.dp:
            raise ConfigError(
                f"train.batch_size={settings.batch_size} must be divisible by the {topo.dp} data-parallel replicas"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for p in params]
        apply_lego_tensor_parallel(model, topo)
        named = dict(model.named_parameters())
        super().__init__(model, [named[n] for n in order], settings)
        self.topo = topo
        self.rows = settings.batch_size // topo.dp

    def _rows(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        rows = slice(self.topo.dp_rank * self.rows, (self.topo.dp_rank + 1) * self.rows)
        return tuple(t[rows] for t in batch)

    def _sync_grads(self) -> None:
        from parallel.tensor import all_reduce_grads

        if self.topo.dp > 1:
            all_reduce_grads(self.params, self.topo.dp_group)

    def _clip_grads(self) -> None:
        from parallel.tensor import clip_grad_norm_

        clip_grad_norm_(self.params, self.grad_clip, self.topo)

    def _sum_over_replicas(self, t: Tensor) -> Tensor:
        if self.topo.dp > 1:
            dist.all_reduce(t, group=self.topo.dp_group)
        return t

    def module_state(self, module: nn.Module) -> dict[str, Tensor]:
        from parallel.tensor import gather_full_state_dict

        return gather_full_state_dict(module, self.topo)

    def optimizer_state(self) -> dict[str, Any]:
        from parallel.tensor import gather_optimizer_state

        local = self.optimizer.state_dict()
        return {
            "state": gather_optimizer_state(local["state"], self.params, self.topo),
            "param_groups": local["param_groups"],
        }

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from parallel.tensor import shard_optimizer_state

        full = {int(k): v for k, v in state["state"].items()}
        self.optimizer.load_state_dict(
            {
                "state": shard_optimizer_state(full, self.params, self.topo),
                "param_groups": state["param_groups"],
            }
        )


def build_phase_step(
    model: LegoMT,
    params: list[nn.Parameter],
    settings: StepSettings,
    parallel: ParallelConfig,
    topo: Topology | None = None,
) -> PhaseStep:
    """Apply the configured engine (tensor parallelism first), then activation checkpointing, to
    one phase's model. ``topo``: the run's built topology (``parallel.engine=megatron``)."""
    if parallel.engine == "megatron":
        if topo is None:
            raise ValueError("parallel.engine=megatron needs the run's built Topology")
        step: PhaseStep = TensorParallelStep(model, params, settings, topo)
    mode = parallel.activation_checkpointing
    if mode != "none":  # after the swap to parallel blocks; names and parameters stay
        apply_activation_checkpointing(model, "selective", selective_modules=CHECKPOINTED_MODULES[mode])
    if parallel.engine == "megatron":
        return step
    if parallel.engine == "deepspeed":
        return DeepSpeedStep(model, params, settings, parallel)
    return LocalStep(model, params, settings)
