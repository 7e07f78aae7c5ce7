"""Context parallelism for linear attention: LASP (linear-attention sequence parallelism).

The sequence is split contiguously over the ``cp`` ranks of ``cp_group``: rank ``r`` holds
tokens ``[r m, (r + 1) m)`` with ``m = n / cp``. Every layer except the token mixer works token
by token, so only the decayed linear attention needs anything from other ranks, and all it
needs is the fp32 state ``S_r`` (``b x H x d x e``) of the tokens before the chunk:

    o_p    = o_local_p + (q_p * lambda^(p+1)) S_r            p = 0..m-1, local positions
    S_r+1  = lambda^m S_r + KV_local_r

``o_local`` and ``KV_local`` (the chunk's own attention and final state from a zero start) are
computed by the ordinary block kernel *before* anything is received, so the expensive
intra-chunk work runs on all ranks at once; only the cheap ``O(m d e)`` inter-chunk term waits
for the state (the overlap of the LASP paper).

Communication (point to point over ``cp_group``, ring without wrap-around), per GLA layer:

* forward: rank ``r`` receives ``S_r`` from ``r - 1`` and sends ``S_r+1`` to ``r + 1``;
* backward: rank ``r`` receives ``dL/dS_r+1`` from ``r + 1`` and sends ``dL/dS_r`` to ``r - 1``.

Each message is one ``b x H x d x e`` fp32 tensor (``d = 2h`` in LRPE layers), so the volume is
``O(b H d e)`` per layer and rank, independent of the sequence length. The hops form a chain:
per layer the forward has ``cp - 1`` sequential hops of ``recv + axpy + send``, the backward the
same in reverse. The sends are blocking (``dist.send``), so a rank may also wait until its
neighbour reaches the same layer; non-blocking sends would remove that wait (not done yet).

Positions are global: LRPE sees offset ``r m``. Use :func:`split_batch_for_cp` for the inputs,
:func:`context_parallel_loss` for the global token mean, and sum the gradients over the cp group
(:func:`all_reduce_gradients`) before clipping and the optimizer step, exactly like data
parallelism with a summed (not averaged) reduction.

Usage::

    model = apply_context_parallel(config.build(), cp_group)
    local = split_batch_for_cp(batch, cp_rank, cp_size)
    loss = context_parallel_loss(model(local.tokens), local.labels, local.loss_mask, cp_group)
    loss.backward(); all_reduce_gradients(model, cp_group)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.data.loader import Batch
from pretrain.models.transnormer.attention import linear_attention
from pretrain.models.transnormer.model import GatedLinearAttention
from pretrain.trainer.train_module import token_loss

__all__ = [
    "all_reduce_gradients",
    "apply_context_parallel",
    "context_parallel_loss",
    "lasp_attention",
    "split_batch_for_cp",
]


@dataclass(frozen=True)
class _CPInfo:
    group: dist.ProcessGroup | None
    rank: int
    size: int


def _position_decay(slope: Tensor, m: int, device: torch.device) -> Tensor:
    """``lambda^(p+1)`` for local positions ``p = 0..m-1``, shape ``(H, m, 1)``, fp32."""
    pos = torch.arange(1, m + 1, device=device, dtype=torch.float32)
    return torch.exp(-slope.float().to(device)[:, None] * pos)[:, :, None]


def _chunk_decay(slope: Tensor, m: int, device: torch.device) -> Tensor:
    """``lambda^m`` as ``(1, H, 1, 1)`` fp32: how much a state decays across a whole chunk."""
    return torch.exp(-slope.float().to(device) * m)[None, :, None, None]


class _LaspStatePass(torch.autograd.Function):
    """Adds the previous ranks' contribution to a chunk's local attention and passes the state on.

    Forward ``(o_local, q, kv_local) -> (o, kv_out)``; the backward receives ``dL/dkv_out`` from the
    next rank and sends ``dL/dS_in`` to the previous one (see the module docstring).
    """

    @staticmethod
    def forward(
        ctx: Any, o_local: Tensor, q: Tensor, kv_local: Tensor, slope: Tensor, info: _CPInfo
    ) -> tuple[Tensor, Tensor]:
        m = q.shape[2]
        first, last = info.rank == 0, info.rank == info.size - 1
        with torch.autocast(q.device.type, enabled=False):
            kv_local = kv_local.float()
            s_in = None
            if first:
                kv_out = kv_local.clone()
            else:
                s_in = torch.empty_like(kv_local)
                dist.recv(s_in, group=info.group, group_src=info.rank - 1)
                kv_out = _chunk_decay(slope, m, q.device) * s_in + kv_local
            if not last:
                dist.send(kv_out, group=info.group, group_dst=info.rank + 1)
            if first:
                o = o_local.clone()
            else:
                inter = (q.float() * _position_decay(slope, m, q.device)) @ s_in
                o = (o_local.float() + inter).to(o_local.dtype)
        ctx.info, ctx.kv_shape = info, kv_local.shape
        ctx.save_for_backward(q, kv_local.new_empty(0) if first else s_in, slope)
        return o, kv_out

    @staticmethod
    def backward(ctx: Any, grad_o: Tensor | None, grad_kv_out: Tensor | None) -> tuple[Tensor | None, ...]:
        q, s_in, slope = ctx.saved_tensors
        info: _CPInfo = ctx.info
        m = q.shape[2]
        first, last = info.rank == 0, info.rank == info.size - 1
        grad_q = ds_in = None
        with torch.autocast(q.device.type, enabled=False):
            if not first and grad_o is not None:
                # The inter-chunk term (q * lambda^(p+1)) S_in, computed before waiting on the next rank.
                g = grad_o.float()
                qdec = _position_decay(slope, m, q.device)
                grad_q = ((g @ s_in.transpose(-1, -2)) * qdec).to(q.dtype)
                ds_in = (q.float() * qdec).transpose(-1, -2) @ g
            # dL/dkv_out: this rank's own use of kv_out (if any) plus all later ranks' (received).
            d_kv_out = grad_kv_out.float() if grad_kv_out is not None else None
            if not last:
                recv = torch.empty(ctx.kv_shape, dtype=torch.float32, device=q.device)
                dist.recv(recv, group=info.group, group_src=info.rank + 1)
                d_kv_out = recv if d_kv_out is None else d_kv_out + recv
            if not first:
                if ds_in is None:
                    ds_in = torch.zeros(ctx.kv_shape, dtype=torch.float32, device=q.device)
                if d_kv_out is not None:
                    ds_in = ds_in + _chunk_decay(slope, m, q.device) * d_kv_out
                dist.send(ds_in, group=info.group, group_dst=info.rank - 1)
        return grad_o, grad_q, d_kv_out, None, None


def _lasp(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, info: _CPInfo, block_size: int, backend: str
) -> tuple[Tensor, Tensor]:
    # The chunk's own attention and state from a zero start: no communication, all ranks at once.
    o_local, kv_local = linear_attention(
        q, k, v, slope, backend=backend, block_size=block_size, return_state=True
    )
    return _LaspStatePass.apply(o_local, q, kv_local, slope, info)


def _info(group: dist.ProcessGroup | None) -> _CPInfo:
    return _CPInfo(group, dist.get_rank(group), dist.get_world_size(group))


def lasp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    cp_group: dist.ProcessGroup | None,
    *,
    block_size: int = 64,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Decayed linear attention of this rank's chunk of a sequence split over ``cp_group``.

    Equal to the matching slice of ``linear_attention`` over the whole sequence, with the state
    of earlier ranks' tokens passed point to point (see the module docstring).

    Args:
        q: Local queries ``(b, H, m, d)`` (LRPE already applied with global positions).
        k: Local keys ``(b, H, m, d)``.
        v: Local values ``(b, H, m, e)``.
        slope: Decay rates ``(H,)``.
        cp_group: The context-parallel group; every rank's chunk has the same length ``m``.
        block_size: Block size of the local Lightning Attention-2 kernel.
        backend: Local kernel, as for ``linear_attention``.

    Returns:
        ``(o (b, H, m, e), kv (b, H, d, e) fp32)``: the output and the state after this rank's
        last token (on the last rank, the state of the whole sequence).
    """
    return _lasp(q, k, v, slope, _info(cp_group), block_size, backend)


def _cp_forward(self: GatedLinearAttention, x: Tensor, *, return_state: bool = False) -> Any:
    """``GatedLinearAttention.forward`` for a chunk of a sequence split over the cp group."""
    info: _CPInfo = self._context_parallel
    n = x.shape[1]
    q, k, v, u = self._project(x, info.rank * n)
    o, kv = _lasp(q, k, v, self.slope, info, self.block_size, getattr(self, "backend", "torch"))
    out = self._output(o, u)
    return (out, kv) if return_state else out


@functools.cache
def _context_parallel_class(base: type) -> type:
    return type(f"ContextParallel{base.__name__}", (base,), {"forward": _cp_forward})


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup | None) -> nn.Module:
    """Make every :class:`GatedLinearAttention` in ``model`` run LASP over ``cp_group``, in place.

    Each token mixer's class is swapped for a subclass whose ``forward`` uses global LRPE
    positions and passes the KV state between ranks; parameter names, the state dict and
    ``isinstance`` checks are unchanged. The model must then be called on this rank's contiguous
    chunk of each sequence (:func:`split_batch_for_cp`), every rank with the same chunk length.
    The recurrent ``step``/``decode_step`` path is untouched (decoding runs on one rank).

    Args:
        model: A built plain TransNormerLLM (or any module containing GLA token mixers).
        cp_group: The context-parallel process group (``None``: the default group).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: If the model has no GLA token mixer or was already transformed.
    """
    info = _info(cp_group)
    mixers = [m for m in model.modules() if isinstance(m, GatedLinearAttention)]
    if not mixers:
        raise ValueError("apply_context_parallel: the model has no GatedLinearAttention token mixer")
    for mixer in mixers:
        if hasattr(mixer, "_context_parallel"):
            raise ValueError("apply_context_parallel: the model is already context parallel")
        for attr in ("_project", "_output", "slope", "block_size"):
            if not hasattr(mixer, attr):
                raise ValueError(f"apply_context_parallel: GatedLinearAttention has no {attr!r} to hook into")
    for mixer in mixers:
        mixer._context_parallel = info
        mixer.__class__ = _context_parallel_class(type(mixer))
    return model


def split_batch_for_cp(batch: Batch, cp_rank: int, cp_size: int) -> Batch:
    """This rank's contiguous slice ``[r n/cp, (r+1) n/cp)`` of tokens, labels and loss mask.

    Raises:
        ValueError: If the sequence length is not divisible by ``cp_size`` or the rank is out of range.
    """
    n = batch.tokens.shape[1]
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need 0 <= cp_rank < cp_size, got {cp_rank=}, {cp_size=}")
    if n % cp_size:
        raise ValueError(
            f"sequence length {n} is not divisible by parallel.cp={cp_size}: change data.seq_len or parallel.cp"
        )
    m = n // cp_size
    sl = slice(cp_rank * m, (cp_rank + 1) * m)
    return Batch(batch.tokens[:, sl], batch.labels[:, sl], batch.loss_mask[:, sl])


class _SumValueLocalGrad(torch.autograd.Function):
    """All-reduce (sum) in the forward; the backward passes the gradient through unchanged, so each
    rank back-propagates its own share and a sum of parameter gradients over the group is exact."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def context_parallel_loss(
    logits: Tensor, labels: Tensor, loss_mask: Tensor, cp_group: dist.ProcessGroup | None
) -> Tensor:
    """Mean next-token loss over the masked-in tokens of the *whole* sequences split over ``cp_group``.

    The value is the global mean (the same on every rank). Its gradient on each rank is that of
    this rank's share ``local_sum / global_count``, so after summing parameter gradients over the
    cp group (:func:`all_reduce_gradients`) they equal the single-process gradient of the mean.

    Args:
        logits: Local logits ``(b, m, vocab)``.
        labels: Local targets ``(b, m)``.
        loss_mask: Local mask ``(b, m)``.
        cp_group: The context-parallel group.
    """
    count = loss_mask.detach().sum().float().reshape(1)
    dist.all_reduce(count, group=cp_group)
    total = _SumValueLocalGrad.apply(token_loss(logits, labels, loss_mask), cp_group)
    return total / count.clamp_min(1.0)[0]


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum every parameter's ``.grad`` over ``group`` (one flat all-reduce per dtype; a missing grad counts as 0).

    Use the cp group (or the combined dp x cp group, dividing by dp afterwards) after the
    backward of :func:`context_parallel_loss`. Tied parameters are reduced once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
