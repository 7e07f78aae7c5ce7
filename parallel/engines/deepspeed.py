"""A TrainModule whose model and optimizer run inside a DeepSpeed engine (ZeRO 0-3).

Same interface as :class:`pretrain.trainer.train_module.TrainModule`, so the trainer and the
checkpoint callback never branch on ``zero``:

* ``train_step(micro_batches)``: engine forward, backward and ``step()`` per micro-batch (DeepSpeed
  counts micro-steps and updates at the last one, so there must be ``train.grad_accum`` of them).
  **Loss normalisation.** The reported loss and the gradient are those of the single-process mean
  over *all* masked-in tokens of all micro-batches on all data-parallel ranks. With ``N`` the
  global token count (one all-reduce before the forward passes), each micro-batch backpropagates
  ``token_loss_sum / N * dp`` with ``scale_wrt_gas=False``: DeepSpeed's own ``1/grad_accum`` is
  switched off and its dp gradient *average* (sum / dp) cancels the ``* dp``. The reported loss is
  the all-reduced sum of the detached token losses over ``N``.
* ``grad_norm``: ``engine.get_global_grad_norm()`` (before clipping, like ``clip_grad_norm_``).
* ``state_dict()`` (a collective: every rank must call it) returns
    - ``model``: the FULL fp32 weights in the plain model's layout (ZeRO-1/2: assembled from the
      fp32 master partitions; ZeRO-3: all-gathered), loadable into a single-process model;
    - ``optimizer``: the single-process TrainModule's torch AdamW ``state_dict`` (param groups
      decay then no-decay, ``state[int] = {step, exp_avg, exp_avg_sq}`` with full tensors),
      consolidated from the ZeRO-1/2/3 flat fp32 partitions (collectives over the dp group; every
      rank gets the full state). :meth:`load_state_dict` partitions such a state into the engine
      under any ZeRO stage and dp size, so DeepSpeed, native and megatron checkpoints are
      interchangeable; under the same layout the resume is bit-exact. The engine's step counters
      are derived from the optimizer step. Checkpoints of the older per-rank format
      (``format: deepspeed-zero-per-rank``) still load under their own stage and dp size;
    - ``scheduler``: our ``LambdaLR`` state (the schedule stays ours in every engine).

Limits: dp only (tp = pp = cp = 1) over the default process group. In bf16 DeepSpeed trains bf16
weights against fp32 masters (not autocast), so bf16 numbers differ from the native module's.
Activation checkpointing is applied to the plain model before it is wrapped here.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_set_full_fp32_param
from torch import nn

from parallel.config import ParallelConfig
from parallel.zero import (
    build_deepspeed_config,
    full_fp32_state_dict,
    gather_adamw_state,
    init_deepspeed_distributed,
    named_unique_params,
    scatter_adamw_state,
)
from pretrain.data.loader import Batch
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import cosine_with_warmup, token_loss

# The format tag of checkpoints written before the canonical layout (still loadable, same layout).
PER_RANK_FORMAT = "deepspeed-zero-per-rank"


class DeepSpeedTrainModule:
    """Model + AdamW + warmup/cosine schedule inside a DeepSpeed engine.

    Args:
        model: the built plain model (``forward(tokens) -> logits``), already transformed by
            activation checkpointing if wanted; DeepSpeed wraps it here.
        train_config: the ``train`` section.
        parallel_config: the ``parallel`` section (``zero_stage``, ``offload``).
        device: where the model lives.
        dp_group: the data-parallel group; ``None`` (or a group spanning all ranks) means the
            default group, the only layout supported here.
        ds_overrides: extra DeepSpeed config keys (see :func:`build_deepspeed_config`).

    Raises:
        ValueError: for tp/pp/cp > 1 or a dp group smaller than the world.
    """

    def __init__(
        self,
        model: nn.Module,
        train_config: TrainConfig,
        parallel_config: ParallelConfig,
        device: torch.device,
        *,
        dp_group: dist.ProcessGroup | None = None,
        ds_overrides: dict[str, Any] | None = None,
    ) -> None:
        if parallel_config.model_parallel_size != 1:
            raise ValueError(
                "DeepSpeedTrainModule runs data parallelism only: set parallel.tp=pp=cp=1 "
                "(use parallel.engine=megatron for model parallelism)"
            )
        init_deepspeed_distributed()
        world = dist.get_world_size()
        if dp_group is not None and dist.get_world_size(dp_group) != world:
            raise ValueError("DeepSpeedTrainModule: the dp group must span all ranks (tp=pp=cp=1)")
        self.dp_group = dp_group
        self.dp_size = world
        self.dp_rank = dist.get_rank()
        self.config = train_config
        self.parallel_config = parallel_config
        self.device = device
        self.grad_accum = train_config.grad_accum
        self.ds_config = build_deepspeed_config(
            train_config,
            parallel_config,
            dp_size=self.dp_size,
            micro_batch_size=train_config.micro_batch_size,
            grad_accum=train_config.grad_accum,
            device=device,
            overrides=ds_overrides,
        )
        model.to(device)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": train_config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # The TrainModule's group order: the canonical optimizer state indexes params in it.
        self._param_groups: list[list[nn.Parameter]] = [g["params"] for g in groups]

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: cosine_with_warmup(
                    s,
                    warmup=train_config.warmup_steps,
                    total=train_config.steps,
                    min_ratio=train_config.min_lr_ratio,
                ),
            )

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=self.ds_config,
            lr_scheduler=schedule,
            dist_init_required=False,
        )
        self.model: nn.Module = self.engine.module
        self.zero_stage = parallel_config.zero_stage
        # ZeRO-0 in fp32 steps a torch optimizer on the model's own parameters; ZeRO-0 in bf16
        # keeps fp32 masters in DeepSpeed's unfused optimizer (``fp32_groups``).
        self._plain_optimizer = isinstance(self.optimizer, torch.optim.Optimizer)
        self._stage0_masters: dict[int, torch.Tensor] = {}
        if self.zero_stage == 0 and hasattr(self.optimizer, "fp32_groups"):
            for low, high in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups, strict=True):
                self._stage0_masters.update({id(p): m for p, m in zip(low, high, strict=True)})

    # -- training --------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One optimizer step over this rank's ``micro_batches`` (the global batch is the union
        over dp ranks). Returns ``loss`` (global masked-token mean), ``grad_norm`` (before
        clipping) and ``lr`` (used by this step), as tensors.

        Raises:
            ValueError: unless there are exactly ``train.grad_accum`` micro-batches (DeepSpeed's
                accumulation boundary is counted in micro-steps).
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(
                f"DeepSpeed steps every train.grad_accum={self.grad_accum} micro-batches, got {len(micro_batches)}"
            )
        self.engine.train()
        n_tokens = sum(mb.loss_mask.sum() for mb in micro_batches).float().to(self.device)
        dist.all_reduce(n_tokens, group=self.dp_group)
        n_tokens = n_tokens.clamp_min(1)
        total = torch.zeros((), device=self.device)
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        own_norm = None
        for i, mb in enumerate(micro_batches):
            logits = self.engine(mb.tokens.to(self.device))
            loss = token_loss(logits, mb.labels.to(self.device), mb.loss_mask.to(self.device))
            self.engine.backward(loss / n_tokens * self.dp_size, scale_wrt_gas=False)
            if i == len(micro_batches) - 1 and self._plain_optimizer:
                # ZeRO-0 fp32 clips inside the engine and drops the norm: measure the
                # all-reduced gradients here, before the step clips them.
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                own_norm = torch.nn.utils.get_total_norm(grads)
            self.engine.step()  # updates only at the accumulation boundary (the last micro-batch)
            total += loss.detach()
        norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(norm, dtype=torch.float32).detach()
        dist.all_reduce(total, group=self.dp_group)
        return {"loss": total / n_tokens, "grad_norm": grad_norm.cpu(), "lr": lr}

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean next-token loss over the masked-in tokens of every rank's ``batches`` (a
        collective: under ZeRO-3 every rank must pass the same number of batches)."""
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for mb in batches:
            logits = self.engine(mb.tokens.to(self.device))
            sums[0] += token_loss(logits, mb.labels.to(self.device), mb.loss_mask.to(self.device)).double()
            sums[1] += float(mb.loss_mask.sum())
        dist.all_reduce(sums, group=self.dp_group)
        self.engine.train()
        return float(sums[0]) / max(float(sums[1]), 1.0)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"}`` (see the module docstring). Collective."""
        return {
            "model": self._full_model_state(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full state in the single-process layout: what :meth:`state_dict` returned under
        any ZeRO stage and dp size, or what the native / megatron train modules save. Collective.

        Raises:
            ValueError: if the optimizer state does not match the model (param groups, shapes), is
                of an unknown kind, or is an older per-rank state saved under another ZeRO stage or
                dp size.
        """
        self.load_model_weights(state["model"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _named_unique_params(self) -> list[tuple[list[str], nn.Parameter]]:
        return named_unique_params(self.model)

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        return full_fp32_state_dict(self.model, self._stage0_masters)

    def load_model_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the weights (and fp32 masters) from a full single-process ``model`` state dict, e.g.
        one saved by the native TrainModule or under another layout. Collective; the optimizer
        state is left as is."""
        expected = set(self.model.state_dict().keys())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(
                f"model state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        param_names = set()
        for names, p in self._named_unique_params():
            param_names.update(names)
            value = weights[names[0]].to(self.device)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                p.data.copy_(value.to(p.dtype).view_as(p.data))
            safe_set_full_fp32_param(p, value.float())
            if id(p) in self._stage0_masters:
                self._stage0_masters[id(p)].data.copy_(value.float().view_as(p.data))
        buffers = {k: v for k, v in weights.items() if k not in param_names}
        self.model.load_state_dict(buffers, strict=False)

    def _optimizer_state(self) -> dict[str, Any]:
        return gather_adamw_state(self.optimizer, self._param_groups, self.zero_stage)

    def _load_optimizer_state(self, part: dict[str, Any]) -> None:
        if part.get("format") == PER_RANK_FORMAT:
            self._load_per_rank_state(part)
            return
        if "param_groups" not in part or "state" not in part:
            raise ValueError(
                "optimizer state is neither a torch AdamW state_dict nor a DeepSpeed per-rank state: "
                "load the model weights only (load_model_weights) and start a fresh optimizer"
            )
        scatter_adamw_state(self.optimizer, self._param_groups, self.zero_stage, part)
        # The engine's counters follow from the optimizer step (fp32/bf16 never skip a step).
        steps = max((int(float(s["step"])) for s in part["state"].values()), default=0)
        self.engine.global_steps = steps
        self.engine.global_samples = steps * self.engine.train_batch_size()
        self.engine.micro_steps = steps * self.grad_accum
        self.engine.skipped_steps = 0

    def _load_per_rank_state(self, part: dict[str, Any]) -> None:
        """Checkpoints written before the canonical layout: DeepSpeed's own partitioned state of
        every rank, loadable only under the same ZeRO stage and dp size."""
        if part["zero_stage"] != self.zero_stage or part["dp"] != self.dp_size:
            raise ValueError(
                f"optimizer state was saved per rank under ZeRO-{part['zero_stage']} with dp={part['dp']}, "
                f"this run has ZeRO-{self.zero_stage} with dp={self.dp_size}: resume with the saved layout, "
                "or load the model weights only (load_model_weights) and start a fresh optimizer"
            )
        sd = dict(part["ranks"][str(self.dp_rank)])
        if self.zero_stage == 0:
            self.optimizer.load_state_dict(sd)
        else:
            sd["zero_stage"] = ZeroStageEnum(sd["zero_stage"])
            sd["loss_scaler"] = self.optimizer.loss_scaler
            self.optimizer.load_state_dict(
                [sd] * self.dp_size, load_optimizer_states=True, load_from_fp32_weights=True
            )
        for name, value in part["engine"].items():
            setattr(self.engine, name, int(value))
