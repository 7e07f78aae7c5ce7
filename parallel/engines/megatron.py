"""The megatron engine's train module: tensor (+ sequence) parallelism from megatron-core and
data parallelism over ``topo.dp_group``, with the interface of the single-process
:class:`pretrain.trainer.train_module.TrainModule`.

Exactness: the loss is the mean over *all* masked-in tokens of all micro-batches on all
data-parallel ranks (the token count is all-reduced first), gradients are summed over the DP
group, and the global gradient norm counts each TP shard once and replicated parameters once.
So a run at tp x dp equals the single-process run on the concatenated batch up to fp32 rounding.

Data parallelism is a flattened all-reduce of the gradients after the last micro-batch (one
collective per step; no overlap with the backward). megatron's ``DistributedDataParallel``
would add bucketing/overlap through ``param.main_grad`` buffers; at the sizes this engine runs
on CPU it buys nothing, and the plain ``.grad`` keeps clipping and the torch optimizer simple.

Checkpoints: :meth:`MegatronTrainModule.state_dict` returns the *full* single-process layout
(model and AdamW moments unsharded, plain parameter names), so a checkpoint saved at tp=2
loads at tp=1 (a plain ``TrainModule``) or any other tp, and vice versa. Memory trade-off: TP
rank 0 of each TP group assembles the whole model and both Adam moments (3x the parameters,
in their dtype) for the duration of the call, and the loader needs the full state on every
rank. Fine while the full state fits one host's memory; beyond that, use sharded checkpoints
(megatron ``dist_checkpointing``, not wired on CPU yet).

Not implemented here: pipeline parallelism (``parallel.pp > 1``), context parallelism (LASP,
``parallel.cp > 1``), megatron's distributed optimizer / ZeRO (use ``engine=deepspeed``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.config import ParallelConfig
from parallel.tensor import (
    apply_tensor_parallel,
    gather_full_state_dict,
    gather_tensor,
    is_tp_sharded,
    load_full_state_dict,
    shard_tensor,
    tp_token_loss,
)
from parallel.topology import Topology
from pretrain.data.loader import Batch
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import cosine_with_warmup, resolve_dtype


def _is_tensor_parallel(model: nn.Module) -> bool:
    return any(is_tp_sharded(p) for p in model.parameters())


class MegatronTrainModule:
    """Model + AdamW + warmup/cosine schedule over a tensor x data parallel layout.

    Every TP rank of a TP group must be given the same micro-batches; each DP rank its own.

    Args:
        model: a built plain TransNormerLLM (same weights on every rank, e.g. same seed) - it is
            sharded in place with :func:`parallel.tensor.apply_tensor_parallel` - or one already
            sharded that way (apply activation checkpointing after TP and pass the result).
        train_config: the ``train`` section (same meaning as for ``TrainModule``).
        parallel_config: the ``parallel`` section; must agree with ``topo``.
        topo: a built :class:`parallel.topology.Topology`.
        device: where the model lives.
        sequence_parallel: Megatron sequence parallelism in the norm/residual regions (tp > 1).
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
    ) -> None:
        if parallel_config.pp > 1:
            raise NotImplementedError(
                "pipeline parallelism (parallel.pp > 1) is not implemented in the megatron engine; use pp=1"
            )
        if parallel_config.cp > 1:
            raise NotImplementedError(
                "context parallelism (parallel.cp > 1, LASP in parallel/context.py) is not wired into the "
                "megatron engine yet; use cp=1"
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
                f"{topo} does not match parallel config tp={parallel_config.tp}, pp={parallel_config.pp}"
            )
        if not topo.is_built:
            raise RuntimeError("MegatronTrainModule needs a built Topology (call topo.build())")
        if not _is_tensor_parallel(model):
            apply_tensor_parallel(model, topo, sequence_parallel=sequence_parallel)
        self.model = model
        self.config = train_config
        self.topo = topo
        self.device = device
        self.autocast_dtype = resolve_dtype(train_config.precision, device)
        # the same parameter groups, in the same order, as TrainModule: optimizer states map 1:1
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": train_config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
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

    def _all_reduce_grads(self) -> None:
        """Sum gradients over the data-parallel group (one flattened collective)."""
        if self.topo.dp == 1:
            return
        params = self._params()
        for p in params:
            if p.grad is None:  # unused on this rank: take part in the collective with zeros
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.topo.dp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradients across TP shards (each counted once; replicated
        parameters counted once) and clipping as ``torch.nn.utils.clip_grad_norm_`` does."""
        grads = [p.grad for p in self._params() if p.grad is not None]
        sharded = [p.grad for p in self._params() if p.grad is not None and is_tp_sharded(p)]
        replicated = [p.grad for p in self._params() if p.grad is not None and not is_tp_sharded(p)]
        zero = torch.zeros((), device=self.device, dtype=torch.float32)
        sq = sum((g.float().pow(2).sum() for g in sharded), zero)
        if self.topo.tp > 1:
            dist.all_reduce(sq, group=self.topo.tp_group)
        sq = sq + sum((g.float().pow(2).sum() for g in replicated), zero)
        norm = sq.sqrt()
        if max_norm != float("inf"):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

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
        for mb in micro_batches:
            with self._autocast():
                logits = self.model(mb.tokens)
            loss = tp_token_loss(logits, mb.labels, mb.loss_mask) / n_tokens
            loss.backward()
            total += loss.detach()
        if self.topo.dp > 1:
            dist.all_reduce(total, group=self.topo.dp_group)
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
        for mb in batches:
            with self._autocast():
                logits = self.model(mb.tokens)
            sums[0] += tp_token_loss(logits, mb.labels, mb.loss_mask).double()
            sums[1] += mb.loss_mask.sum().double()
        if self.topo.dp > 1:
            dist.all_reduce(sums, group=self.topo.dp_group)
        self.model.train()
        return float(sums[0]) / max(float(sums[1]), 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Full single-process-layout state (``model``, ``optimizer``, ``scheduler``), loadable by
        ``TrainModule`` or by this class at any tp.

        Collective over the TP group; TP rank 0 of each group gets the state, other ranks ``{}``.
        """
        model = gather_full_state_dict(self.model, self.topo)
        local = self.optimizer.state_dict()
        params = self._params()
        state: dict[int, dict[str, Any]] = {}
        for idx in sorted(local["state"]):  # same order on every rank: the gathers pair up
            p = params[idx]
            entry = {}
            for key, value in local["state"][idx].items():
                if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                    entry[key] = gather_tensor(value, p, self.topo)
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
            state[idx] = entry
        if self.topo.tp_rank != 0:
            return {}
        return {
            "model": model,
            "optimizer": {"state": state, "param_groups": local["param_groups"]},
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full single-process-layout state (from this class at any tp, or from
        ``TrainModule``); every rank passes the same full state and keeps its shard."""
        load_full_state_dict(self.model, state["model"], self.topo)
        full = state["optimizer"]
        params = self._params()
        local_state = {}
        for idx, entry in full["state"].items():
            p = params[int(idx)]
            local_state[idx] = {
                key: shard_tensor(value, p, self.topo)
                if torch.is_tensor(value) and value.dim() > 0 and is_tp_sharded(p)
                else value
                for key, value in entry.items()
            }
        self.optimizer.load_state_dict({"state": local_state, "param_groups": full["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
