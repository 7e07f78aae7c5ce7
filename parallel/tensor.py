"""Tensor (and Megatron sequence) parallelism for a built plain TransNormerLLM.

:func:`apply_tensor_parallel` swaps modules of the plain model in place for megatron-core
tensor-parallel ones holding this rank's shard of the dense weights; the model file is not
touched and parameter names stay those of the plain model. Per layer:

* GLA: heads are split across TP ranks. The fused ``qkvu_proj`` (output ``[q | k | v | u]``,
  each ``H * h`` wide, heads contiguous) becomes a ``ColumnParallelLinear`` whose local rows are
  ``[q_r | k_r | v_r | u_r]`` - the columns of this rank's heads in each of the four parts
  (megatron's ``partition_stride=4``). ``out_proj`` is a ``RowParallelLinear``. The decay slopes
  and the LRPE ``theta`` are sliced to the local heads. The norm over all heads concatenated
  all-reduces its sum of squares over the TP group (:class:`TensorParallelSRMSNorm`).
* SGLU: ``l1``, ``l2`` column-parallel, ``l3`` row-parallel.
* ``embed_tokens``: ``VocabParallelEmbedding``; ``lm_head``: column-parallel over the vocabulary,
  returning vocab-parallel logits ``(b, n, V / tp)`` for ``vocab_parallel_cross_entropy``
  (:func:`tp_token_loss`); :func:`gather_logits` assembles full logits when needed.
* With ``sequence_parallel=True`` (Megatron SP) the residual stream, the SRMSNorms and the
  residual adds work on this rank's slice of the sequence: activations between layers are
  ``(n / tp, b, d)`` (sequence first, as megatron's SP collectives split dim 0); the
  embedding reduce-scatters, column-parallel layers all-gather the sequence, row-parallel
  layers reduce-scatter it. The norms have no parameters, so no extra gradient reduction.

:func:`gather_full_state_dict` / :func:`load_full_state_dict` convert between the sharded
model and the plain single-process state dict, which makes checkpoints reshardable.

Only the training forward is parallelised: ``prefill`` / ``decode_step`` of a TP model raise;
gather the state and decode with a plain model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.cpu_shims import apply_cpu_shims
from parallel.topology import Topology
from pretrain.models.transnormer import model as tnl_model
from pretrain.models.transnormer.model import SGLU, GatedLinearAttention, TransNormerLLM


def _no_init(weight: Tensor) -> None:
    """megatron init_method placeholder: weights are copied in from the dense model."""


def _mark(param: Tensor, dim: int, stride: int = 1) -> None:
    """Record how ``param`` is split (megatron's attributes; read by the state-dict helpers)."""
    tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, stride)


def shard(full: Tensor, dim: int, stride: int, rank: int, size: int) -> Tensor:
    """This rank's part of ``full`` split along ``dim``, megatron's ``partition_stride`` layout:
    ``full`` is cut into ``stride * size`` equal chunks and rank ``r`` takes chunks ``r, r + size, ...``."""
    chunks = full.chunk(stride * size, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim).clone()


def unshard(parts: list[Tensor], dim: int, stride: int) -> Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's part (in rank order)."""
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in forward and backward: for a value every rank *uses differently*
    downstream (unlike megatron's ``reduce_from_tensor_model_parallel_region``, whose identity
    backward assumes replicated use)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TensorParallelSRMSNorm(nn.Module):
    """SRMSNorm over a feature dimension split across the TP group: ``x * rsqrt(sum_all(x^2) / width + eps)``.

    Args:
        width: the full (all ranks) feature width.
        eps: as in SRMSNorm.
        tp_group: the group holding the other slices.
    """

    def __init__(self, width: int, eps: float, tp_group: Any) -> None:
        super().__init__()
        self.width, self.eps, self.tp_group = width, eps, tp_group

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        sumsq = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), self.tp_group)
        return (xf * torch.rsqrt(sumsq / self.width + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, eps={self.eps}"


class _ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """ColumnParallelLinear returning only the output (no bias here); with SP it all-gathers dim 0."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _RowLinear(tensor_parallel.RowParallelLinear):
    """RowParallelLinear returning only the output; with SP it reduce-scatters dim 0."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class _VocabHead(tensor_parallel.ColumnParallelLinear):
    """lm_head over a vocabulary split across TP: batch-first vocab-parallel logits ``(b, n, V / tp)``."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = super().forward(x)[0]
        return out.transpose(0, 1).contiguous() if self.sequence_parallel else out


class _VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocab-parallel embedding; with SP its output is this rank's ``(n / tp, b, d)`` sequence slice."""


def column_parallel_linear(
    dense: nn.Linear, cfg: ModelParallelConfig, group: Any, rank: int, size: int, stride: int = 1
) -> _ColumnLinear:
    """A megatron ``ColumnParallelLinear`` holding this rank's rows of ``dense`` (and of its bias)."""
    out_f, in_f = dense.weight.shape
    bias = dense.bias is not None
    layer = _ColumnLinear(
        in_f, out_f, config=cfg, init_method=_no_init, bias=bias, stride=stride, tp_group=group
    )
    with torch.no_grad():
        layer.weight.copy_(shard(dense.weight, 0, stride, rank, size))
        if bias:
            layer.bias.copy_(shard(dense.bias, 0, stride, rank, size))
    _mark(layer.weight, 0, stride)  # megatron marks the bias itself
    return layer.to(dense.weight.device)


def row_parallel_linear(
    dense: nn.Linear, cfg: ModelParallelConfig, group: Any, rank: int, size: int
) -> _RowLinear:
    """A megatron ``RowParallelLinear`` holding this rank's columns of ``dense``; the bias, added
    after the all-reduce, stays whole on every rank."""
    out_f, in_f = dense.weight.shape
    bias = dense.bias is not None
    layer = _RowLinear(
        in_f, out_f, config=cfg, init_method=_no_init, bias=bias, input_is_parallel=True,
        skip_bias_add=False, tp_group=group,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight.copy_(shard(dense.weight, 1, 1, rank, size))
        if bias:
            layer.bias.copy_(dense.bias)
    _mark(layer.weight, 1)
    return layer.to(dense.weight.device)


class TensorParallelGLA(nn.Module):
    """Gated linear attention over this rank's heads (see the module docstring for the layout).

    Built from a plain :class:`GatedLinearAttention`; submodule names match it.
    """

    def __init__(self, plain: GatedLinearAttention, cfg: ModelParallelConfig, topo: Topology) -> None:
        super().__init__()
        rank, size, group = topo.tp_rank, topo.tp, topo.tp_group
        self.n_heads = plain.n_heads // size
        self.head_dim = plain.head_dim
        self.block_size = plain.block_size
        self.backend = getattr(plain, "backend", "torch")
        self.sequence_parallel = cfg.sequence_parallel
        self.qkvu_proj = column_parallel_linear(plain.qkvu_proj, cfg, group, rank, size, stride=4)
        self.out_proj = row_parallel_linear(plain.out_proj, cfg, group, rank, size)
        self.norm = TensorParallelSRMSNorm(plain.n_heads * plain.head_dim, plain.norm.eps, group)
        self.lrpe = plain.lrpe
        if self.lrpe is not None:
            theta = nn.Parameter(shard(self.lrpe.theta.detach(), 0, 1, rank, size))
            _mark(theta, 0)
            self.lrpe.theta = theta
        heads = slice(rank * self.n_heads, (rank + 1) * self.n_heads)
        self._slope_fp32 = plain.slope.detach().float().cpu()[heads].clone()
        self.slope: Tensor
        self.register_buffer("slope", self._slope_fp32.to(plain.slope.device), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> TensorParallelGLA:
        # Like the plain module: the decay rates stay exact fp32 through dtype casts.
        super()._apply(fn, recurse)
        self.slope = self._slope_fp32.to(self.slope.device)
        return self

    def forward(self, x: Tensor, *, return_state: bool = False) -> Tensor:
        """``x`` ``(b, n, d)``, or ``(n / tp, b, d)`` with sequence parallelism; same layout out."""
        if return_state:
            raise NotImplementedError(
                "prefill/decoding is not tensor-parallel: gather_full_state_dict() and use a plain model"
            )
        qkvu = self.qkvu_proj(x)  # (b, n, 4w/tp), or (n, b, 4w/tp) with SP
        if self.sequence_parallel:
            qkvu = qkvu.transpose(0, 1)
        b, n, _ = qkvu.shape
        q, k, v, u = qkvu.chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        q, k, v = (t.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.lrpe is not None:
            q, k = self.lrpe(q, 0), self.lrpe(k, 0)
        # the kernel entry the plain model uses, looked up at call time so both stay on one kernel
        o = tnl_model.linear_attention(q, k, v, self.slope, backend=self.backend, block_size=self.block_size)
        o = o.transpose(1, 2).reshape(b, n, -1)
        y = self.norm(o) * u
        if self.sequence_parallel:
            y = y.transpose(0, 1).contiguous()
        return self.out_proj(y)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "decoding is not tensor-parallel: gather_full_state_dict() and use a plain model"
        )


class TensorParallelSGLU(nn.Module):
    """``l3(l1(x) * l2(x))`` with ``l1, l2`` column- and ``l3`` row-parallel (any layout; SP: sequence first)."""

    def __init__(self, plain: SGLU, cfg: ModelParallelConfig, topo: Topology) -> None:
        super().__init__()
        rank, size, group = topo.tp_rank, topo.tp, topo.tp_group
        self.l1 = column_parallel_linear(plain.l1, cfg, group, rank, size)
        self.l2 = column_parallel_linear(plain.l2, cfg, group, rank, size)
        self.l3 = row_parallel_linear(plain.l3, cfg, group, rank, size)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.l1(x) * self.l2(x))


def parallel_layer_config(topo: Topology, sequence_parallel: bool, dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=topo.tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def apply_tensor_parallel(
    model: TransNormerLLM, topo: Topology, *, sequence_parallel: bool = False
) -> TransNormerLLM:
    """Shard a built plain TransNormerLLM over ``topo.tp_group``, in place.

    Every rank must hold the same dense weights (e.g. built with the same seed, or loaded from
    the same checkpoint); each keeps only its shard. Afterwards ``model(tokens)`` returns
    vocab-parallel logits ``(b, n, V / tp)``: use :func:`tp_token_loss` or :func:`gather_logits`.

    Args:
        model: the plain model (not yet wrapped, cast or compiled).
        topo: a built topology; ``topo.tp`` ranks share the model.
        sequence_parallel: Megatron sequence parallelism in the norm/residual regions
            (needs the sequence length divisible by ``tp``).

    Returns:
        ``model`` itself.
    """
    apply_cpu_shims()
    if not topo.is_built:
        raise RuntimeError("apply_tensor_parallel needs a built Topology (call topo.build())")
    topo.validate_for_model(model.config)
    if topo.tp == 1:
        if sequence_parallel:
            raise ValueError("sequence_parallel needs parallel.tp > 1")
        return model
    device = model.lm_head.weight.device
    cfg = parallel_layer_config(topo, sequence_parallel, model.lm_head.weight.dtype)
    rank, size, group = topo.tp_rank, topo.tp, topo.tp_group
    for layer in model.model.layers:
        layer.token_mixer = TensorParallelGLA(layer.token_mixer, cfg, topo)
        layer.channel_mixer = TensorParallelSGLU(layer.channel_mixer, cfg, topo)

    dense_emb = model.model.embed_tokens
    vocab, dim = dense_emb.weight.shape
    emb = _VocabEmbedding(
        vocab,
        dim,
        init_method=_no_init,
        reduce_scatter_embeddings=sequence_parallel,
        config=cfg,
        tp_group=group,
    )
    with torch.no_grad():
        emb.weight.copy_(shard(dense_emb.weight, 0, 1, rank, size))
    _mark(emb.weight, 0)
    head = _VocabHead(dim, vocab, config=cfg, init_method=_no_init, bias=False, tp_group=group)
    if model.config.tie_word_embeddings:
        head.weight = emb.weight
    else:
        with torch.no_grad():
            head.weight.copy_(shard(model.lm_head.weight, 0, 1, rank, size))
        _mark(head.weight, 0)
    model.model.embed_tokens = emb
    model.lm_head = head
    return model.to(device)


def tp_token_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Summed next-token cross-entropy of vocab-parallel ``logits`` over the masked-in positions (fp32).

    The TP counterpart of ``pretrain.trainer.train_module.token_loss``; equal on every TP rank.
    Like megatron's ``vocab_parallel_cross_entropy`` (to save the memory of a copy) it
    overwrites fp32 ``logits`` in place: gather or inspect them before calling this.
    """
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    return (losses * loss_mask.float()).sum()


def gather_logits(logits: Tensor, topo: Topology) -> Tensor:
    """Full-vocabulary logits from vocab-parallel ones (every TP rank gets them; no gradient)."""
    if topo.tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(topo.tp)]
    dist.all_gather(parts, logits.detach().contiguous(), group=topo.tp_group)
    return torch.cat(parts, dim=-1)


def is_tp_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a tensor-parallel shard (vs. replicated on every TP rank)."""
    return bool(getattr(t, "tensor_model_parallel", False))


def gather_tensor(t: Tensor, like: Tensor, topo: Topology, *, to_all: bool = False) -> Tensor | None:
    """Reassemble a tensor sharded like parameter ``like`` (e.g. the parameter, its gradient or
    an optimizer moment). Returns it on TP rank 0 (every TP rank with ``to_all``), else None."""
    t = t.detach().contiguous()
    if not is_tp_sharded(like) or topo.tp == 1:
        return t.clone() if to_all or topo.tp_rank == 0 else None
    dim, stride = like.partition_dim, like.partition_stride
    if to_all:
        parts = [torch.empty_like(t) for _ in range(topo.tp)]
        dist.all_gather(parts, t, group=topo.tp_group)
        return unshard(parts, dim, stride)
    parts = [torch.empty_like(t) for _ in range(topo.tp)] if topo.tp_rank == 0 else None
    dist.gather(t, parts, group=topo.tp_group, group_dst=0)
    return unshard(parts, dim, stride) if parts is not None else None


def shard_tensor(full: Tensor, like: Tensor, topo: Topology) -> Tensor:
    """This rank's shard of ``full`` for a tensor split like parameter ``like``."""
    if not is_tp_sharded(like) or topo.tp == 1:
        return full.clone()
    return shard(full, like.partition_dim, like.partition_stride, topo.tp_rank, topo.tp)


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state entries (parameters and persistent buffers), megatron's ``_extra_state`` left out."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def gather_full_state_dict(model: nn.Module, topo: Topology) -> dict[str, Tensor]:
    """The plain single-process state dict (same keys and layout) of a tensor-parallel model.

    Collective over the TP group. TP rank 0 of each TP group (so global rank 0) gets the full
    dict; other ranks get ``{}``. Tensors are detached CPU-side copies of the values.
    """
    out: dict[str, Tensor] = {}
    done: dict[int, Tensor | None] = {}
    for name, t in _model_tensors(model).items():
        if id(t) not in done:  # tied weights: gather once
            done[id(t)] = gather_tensor(t, t, topo)
        full = done[id(t)]
        if full is not None:
            out[name] = full
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, Tensor], topo: Topology) -> None:
    """Load a plain single-process state dict into a tensor-parallel model: each rank takes its shard.

    Every rank needs ``full`` (e.g. each reads the same checkpoint). Raises KeyError naming any
    missing or unexpected keys.
    """
    own = _model_tensors(model)
    missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
    for name, t in own.items():
        value = shard_tensor(full[name].to(t.device, t.dtype), t, topo)
        if value.shape != t.shape:
            raise ValueError(f"{name}: shard shape {tuple(value.shape)} != parameter shape {tuple(t.shape)}")
        t.copy_(value)


def all_reduce_grads(params: list[nn.Parameter], group: Any) -> None:
    """Sum the gradients of ``params`` over ``group`` in one flattened collective (data parallelism
    over replicas). A parameter without a gradient on this rank takes part with zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, topo: Topology) -> Tensor:
    """Global L2 norm of the gradients of a tensor- (and pipeline-) parallel model, and clipping
    as ``torch.nn.utils.clip_grad_norm_`` does: each TP shard counts once, a parameter replicated
    over the TP group counts once, and the pipeline stages' parts add up."""
    with_grad = [p for p in params if p.grad is not None]
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    zero = torch.zeros((), device=device, dtype=torch.float32)
    sq = sum((p.grad.float().pow(2).sum() for p in with_grad if is_tp_sharded(p)), zero)
    if topo.tp > 1:
        dist.all_reduce(sq, group=topo.tp_group)
    sq = sq + sum((p.grad.float().pow(2).sum() for p in with_grad if not is_tp_sharded(p)), zero)
    if topo.pp > 1:
        dist.all_reduce(sq, group=topo.pp_group)
    norm = sq.sqrt()
    if max_norm != float("inf") and with_grad:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in with_grad], coef)
    return norm


def gather_optimizer_state(
    state: dict[int, dict[str, Any]], params: list[nn.Parameter], topo: Topology
) -> dict[int, dict[str, Any]]:
    """Per-parameter optimizer state (``optimizer.state_dict()["state"]``, indexed like ``params``)
    with every moment of a TP-sharded parameter reassembled; scalars (``step``) are copied.
    Collective over the TP group; on TP ranks other than 0 the moments are ``None``."""
    out: dict[int, dict[str, Any]] = {}
    for idx in sorted(state):  # same order on every rank: the gathers pair up
        p = params[idx]
        out[idx] = {
            key: gather_tensor(value, p, topo)
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape
            else (value.clone() if torch.is_tensor(value) else value)
            for key, value in state[idx].items()
        }
    return out


def shard_optimizer_state(
    state: dict[int, dict[str, Any]], params: list[nn.Parameter], topo: Topology
) -> dict[int, dict[str, Any]]:
    """Inverse of :func:`gather_optimizer_state`: this rank's shard of each full moment."""
    return {
        idx: {
            key: shard_tensor(value, params[idx], topo)
            if torch.is_tensor(value) and value.dim() > 0 and is_tp_sharded(params[idx])
            else value
            for key, value in entry.items()
        }
        for idx, entry in state.items()
    }
