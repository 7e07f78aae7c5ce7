"""The megatron engine's train module: tensor (+ sequence) parallelism from megatron-core,
pipeline parallelism driven by megatron-core's 1F1B schedule (:mod:`parallel.pipeline`),
context parallelism by LASP (:mod:`parallel.context`) and data parallelism over
``topo.dp_group``, with the interface of the single-process
:class:`pretrain.trainer.train_module.TrainModule`.

Order of the transforms: tensor parallelism on the whole model, then context parallelism
(swaps the token mixers), then the pipeline split keeps this rank's stage.

Exactness: the loss is the mean over *all* masked-in tokens of all micro-batches on all
data-parallel ranks (the token count is all-reduced first; each cp rank counts the full
sequences it was given, so the dp group suffices), each cp rank back-propagates the share of
its sequence chunk, gradients are summed over the dp x cp group, and the global gradient norm
counts each TP shard once, replicated parameters once and sums over the pipeline stages. So a
run at tp x pp x cp x dp equals the single-process run on the concatenated batch up to fp32
rounding. With pp > 1 the train micro-batches are the schedule's micro-batches (1F1B), and
the loss is computed on the last stage and broadcast over the pipeline group.

Data parallelism is a flattened all-reduce of the gradients after the last micro-batch (one
collective per step; no overlap with the backward). megatron's ``DistributedDataParallel``
would add bucketing/overlap through ``param.main_grad`` buffers; at the sizes this engine runs
on CPU it buys nothing, and the plain ``.grad`` keeps clipping and the torch optimizer simple.

Checkpoints: :meth:`MegatronTrainModule.state_dict` returns the *full* single-process layout
(model and AdamW moments unsharded and gathered from every pipeline stage, plain parameter
names, optimizer indices of the single-process model), so a checkpoint saved at tp=2 x pp=2
loads at tp=1 (a plain ``TrainModule``) or any other layout, and vice versa. Memory
trade-off: global rank 0 (TP rank 0 and first stage of each replica) assembles the whole model
and both Adam moments (3x the parameters, in their dtype) for the duration of the call, and
the loader needs the full state on every rank. Fine while the full state fits one host's memory; beyond that, use sharded checkpoints
(megatron ``dist_checkpointing``, not wired on CPU yet).

Not implemented here: context parallelism together with tensor parallelism (LASP swaps the
plain token mixer, not the tensor-parallel one), tied embeddings with pp > 1, megatron's
distributed optimizer / ZeRO (use ``engine=deepspeed``). The interleaved (virtual pipeline)
schedule runs (``virtual_stages``) but has no config field yet.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.config import ParallelConfig
from parallel.context import apply_context_parallel, split_batch_for_cp
from parallel.pipeline import apply_pipeline_parallel, run_schedule
from parallel.tensor import (
    all_reduce_grads,
    apply_tensor_parallel,
    clip_grad_norm_,
    gather_full_state_dict,
    gather_optimizer_state,
    is_tp_sharded,
    load_full_state_dict,
    shard_optimizer_state,
    tp_token_loss,
)
from parallel.topology import Topology
from pretrain.data.loader import Batch
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import cosine_with_warmup, resolve_dtype


def _is_tensor_parallel(model: nn.Module) -> bool:
    return any(is_tp_sharded(p) for p in model.parameters())


def _is_context_parallel(model: nn.Module) -> bool:
    return any(hasattr(m, "_context_parallel") for m in model.modules())


def _optimizer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names in ``TrainModule``'s optimizer order: decayed (ndim >= 2), then the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n, p in named if p.ndim >= 2]
    no_decay = [n for n, p in named if p.ndim < 2]
    return [decay, no_decay] if no_decay else [decay]


class MegatronTrainModule:
    """Model + AdamW + warmup/cosine schedule over a tensor x pipeline x context x data parallel layout.

    Every TP, CP and PP rank of a data-parallel replica must be given the same (whole-sequence)
    micro-batches; each DP rank its own.

    Args:
        model: a built plain TransNormerLLM (same weights on every rank, e.g. same seed) - it is
            sharded in place with :func:`parallel.tensor.apply_tensor_parallel` - or one already
            sharded that way (apply activation checkpointing after TP and pass the result).
        train_config: the ``train`` section (same meaning as for ``TrainModule``).
        parallel_config: the ``parallel`` section; must agree with ``topo``.
        topo: a built :class:`parallel.topology.Topology`.
        device: where the model lives.
        sequence_parallel: Megatron sequence parallelism in the norm/residual regions (tp > 1).
        virtual_stages: model chunks per pipeline rank (> 1: megatron's interleaved 1F1B
            schedule; needs ``n_layers`` divisible by ``pp * virtual_stages`` and at least ``pp``
            micro-batches per step).
    """

    def __init__(
        self,
        model: nn.Module,
        train_config: TrainConfig,
        parallel_config: ParallelConfig,
        topo: Topology,
        device: torch.device,
        *,
        sequence_parallel: bool = False,
        virtual_stages: int = 1,
    ) -> None:
        if virtual_stages > 1 and parallel_config.pp == 1:
            raise ValueError("virtual pipeline stages need parallel.pp > 1")
        if parallel_config.cp > 1 and parallel_config.tp > 1:
            raise NotImplementedError(
                "context parallelism (LASP) together with tensor parallelism is not implemented: "
                "set parallel.tp=1 or parallel.cp=1"
            )
        if parallel_config.zero_stage > 0 or parallel_config.offload:
            raise NotImplementedError(
                "ZeRO / optimizer offload are not part of the megatron engine: use parallel.engine=deepspeed"
            )
        if device.type == "cpu" and resolve_dtype(train_config.precision, device) is not None:
            raise NotImplementedError(
                "bf16 autocast on CPU is not supported by the megatron engine: megatron-core's tensor-parallel "
                "linear binds its autocast handling to CUDA, so its backward mixes bf16 and fp32 on CPU; "
                "use train.precision=fp32 (or auto, which picks fp32 on CPU)"
            )
        if (topo.tp, topo.pp, topo.cp) != (parallel_config.tp, parallel_config.pp, parallel_config.cp):
            raise ValueError(
                f"{topo} does not match parallel config tp={parallel_config.tp}, pp={parallel_config.pp}, "
                f"cp={parallel_config.cp}"
            )
        if not topo.is_built:
            raise RuntimeError("MegatronTrainModule needs a built Topology (call topo.build())")
        if not _is_tensor_parallel(model):
            apply_tensor_parallel(model, topo, sequence_parallel=sequence_parallel)
        if topo.cp > 1 and not _is_context_parallel(model):
            apply_context_parallel(model, topo.cp_group)
        # the single-process optimizer layout, recorded before the pipeline split drops parts
        full_groups = _optimizer_groups(model)
        if topo.pp > 1:
            model = apply_pipeline_parallel(
                model, topo, sequence_parallel=sequence_parallel, virtual_stages=virtual_stages
            )
        self.model = model
        self.config = train_config
        self.topo = topo
        self.device = device
        self.sequence_parallel = sequence_parallel
        self.autocast_dtype = resolve_dtype(train_config.precision, device)
        # The same parameter groups as TrainModule (a stage keeps its part of each, possibly none):
        # local optimizer index i is full index self._full_index[i].
        local = dict(model.named_parameters())
        full_order = [n for g in full_groups for n in g]
        self._full_size = [len(g) for g in full_groups]
        local_groups = [[n for n in g if n in local] for g in full_groups]
        self._full_index = [full_order.index(n) for g in local_groups for n in g]
        decays = [train_config.weight_decay, 0.0]
        groups = [
            {"params": [local[n] for n in g], "weight_decay": wd}
            for g, wd in zip(local_groups, decays, strict=False)
        ]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=train_config.lr,
            betas=train_config.betas,
            eps=train_config.eps,
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(
                s,
                warmup=train_config.warmup_steps,
                total=train_config.steps,
                min_ratio=train_config.min_lr_ratio,
            ),
        )

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _local(self, mb: Batch) -> Batch:
        """This cp rank's chunk of a whole-sequence micro-batch."""
        return split_batch_for_cp(mb, self.topo.cp_rank, self.topo.cp) if self.topo.cp > 1 else mb

    def _reduce_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data x context parallel group (in place), e.g. per-rank loss shares."""
        if self.topo.dp * self.topo.cp > 1:
            dist.all_reduce(t, group=self.topo.dp_cp_group)
        return t

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's value of ``t`` on every stage (in place)."""
        if self.topo.pp > 1:
            dist.broadcast(t, group=self.topo.pp_group, group_src=self.topo.pp - 1)
        return t

    def _all_reduce_grads(self) -> None:
        """Sum gradients over the data x context parallel group (one flattened collective)."""
        if self.topo.dp * self.topo.cp > 1:
            all_reduce_grads(self._params(), self.topo.dp_cp_group)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self._params(), max_norm, self.topo)

    def _pipeline(self, micro_batches: list[Batch], loss_of: Any, *, forward_only: bool) -> list[Any]:
        """megatron's 1F1B schedule over ``micro_batches``; ``loss_of(logits, local_batch)`` is
        the last stage's loss function. Returns its reports (last stage only)."""

        def forward_step(data: Any, stage: nn.Module) -> tuple[torch.Tensor, Any]:
            mb = self._local(next(data))
            with self._autocast():
                out = stage(mb.tokens)
            return out, lambda logits: loss_of(logits, mb)

        tokens = micro_batches[0].tokens
        return run_schedule(
            self.model,
            self.topo,
            forward_step,
            lambda: iter(micro_batches),
            num_microbatches=len(micro_batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=forward_only,
        )

    def train_step(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One optimizer step over this rank's ``micro_batches``; the loss is the mean over all
        masked-in tokens of every DP rank's micro-batches (the single-process loss).

        Returns tensors: ``loss`` (global), ``grad_norm`` (before clipping), ``lr``.
        """
        self.model.train()
        n_tokens = sum(mb.loss_mask.sum() for mb in micro_batches).float()
        if self.topo.dp > 1:
            dist.all_reduce(n_tokens, group=self.topo.dp_group)
        n_tokens = n_tokens.clamp_min(1)
        total = torch.zeros((), device=self.device)
        if self.topo.pp > 1:

            def loss_of(logits: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss = tp_token_loss(logits, mb.labels, mb.loss_mask) / n_tokens
                return loss, mb.loss_mask.sum().int(), {"loss": loss.detach()}

            for report in self._pipeline(micro_batches, loss_of, forward_only=False):
                total += report["loss"]
        else:
            for mb in map(self._local, micro_batches):
                with self._autocast():
                    logits = self.model(mb.tokens)
                loss = tp_token_loss(logits, mb.labels, mb.loss_mask) / n_tokens
                loss.backward()
                total += loss.detach()
        self._from_last_stage(self._reduce_replicas(total))
        self._all_reduce_grads()
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = self._clip_grad_norm(max_norm)
        lr = torch.tensor(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": grad_norm.detach(), "lr": lr}

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean next-token loss (nats) over every DP rank's ``batches``."""
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, token count
        if self.topo.pp > 1:

            def loss_of(logits: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
                loss = tp_token_loss(logits, mb.labels, mb.loss_mask)
                count = mb.loss_mask.sum()
                return loss, count.int(), {"sum": loss.double(), "count": count.double()}

            for report in self._pipeline(batches, loss_of, forward_only=True):
                sums[0] += report["sum"]
                sums[1] += report["count"]
        else:
            for mb in map(self._local, batches):
                with self._autocast():
                    logits = self.model(mb.tokens)
                sums[0] += tp_token_loss(logits, mb.labels, mb.loss_mask).double()
                sums[1] += mb.loss_mask.sum().double()
        self._from_last_stage(self._reduce_replicas(sums))
        self.model.train()
        return float(sums[0]) / max(float(sums[1]), 1.0)

    def _full_param_groups(self, local_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Optimizer param groups with the single-process model's parameter indices."""
        out, start = [], 0
        for group, size in zip(local_groups, self._full_size, strict=True):
            out.append({**group, "params": list(range(start, start + size))})
            start += size
        return out

    def state_dict(self) -> dict[str, Any]:
        """Full single-process-layout state (``model``, ``optimizer``, ``scheduler``), loadable by
        ``TrainModule`` or by this class at any tp / pp / cp.

        Collective over the TP and pipeline groups; TP rank 0 of the first stage of each replica
        (so global rank 0) gets the state, other ranks ``{}``.
        """
        model = gather_full_state_dict(self.model, self.topo)
        local = self.optimizer.state_dict()
        gathered = gather_optimizer_state(local["state"], self._params(), self.topo)
        state = {self._full_index[idx]: entry for idx, entry in gathered.items()}
        if self.topo.pp > 1:  # every stage's part to the first stage
            parts: list[Any] | None = [None] * self.topo.pp if self.topo.is_first_stage else None
            mine = (model, state) if self.topo.tp_rank == 0 else None
            dist.gather_object(mine, parts, group=self.topo.pp_group, group_dst=0)
            if parts is not None and self.topo.tp_rank == 0:
                model, state = {}, {}
                for part_model, part_state in parts:
                    model.update(part_model)
                    state.update(part_state)
        if self.topo.tp_rank != 0 or not self.topo.is_first_stage:
            return {}
        return {
            "model": model,
            "optimizer": {
                "state": dict(sorted(state.items())),
                "param_groups": self._full_param_groups(local["param_groups"]),
            },
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full single-process-layout state (from this class at any layout, or from
        ``TrainModule``); every rank passes the same full state and keeps its part."""
        own = set(self.model.state_dict())
        load_full_state_dict(self.model, {k: v for k, v in state["model"].items() if k in own}, self.topo)
        full = state["optimizer"]
        full_state = {int(k): v for k, v in full["state"].items()}
        local_state = shard_optimizer_state(
            {idx: full_state[f] for idx, f in enumerate(self._full_index) if f in full_state},
            self._params(),
            self.topo,
        )
        local_groups, start = [], 0
        for group in full["param_groups"]:
            n_local = len(self.optimizer.param_groups[len(local_groups)]["params"])
            local_groups.append({**group, "params": list(range(start, start + n_local))})
            start += n_local
        self.optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})
        self.scheduler.load_state_dict(state["scheduler"])
