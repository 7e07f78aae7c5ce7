"""Tensor parallelism for Lego-MT blocks, with megatron-core's parallel linears.

:func:`apply_lego_tensor_parallel` swaps, in place, every attention and feed-forward block of a
built plain :class:`~pretrain.models.lego_mt.LegoMT` (shared parts and resident branches alike)
for one holding this rank's shard; parameter names stay those of the plain model:

* attention (self and cross): heads are split across the TP group. ``q``, ``k``, ``v`` become
  ``ColumnParallelLinear`` (this rank's heads, with their bias), ``o`` a ``RowParallelLinear``
  whose bias is added once after the all-reduce.
* feed-forward: ``up`` column-parallel (the ReLU acts on this rank's columns), ``down``
  row-parallel.
* the shared embedding (tied to the output projection), the LayerNorms and the row-parallel
  biases stay whole on every rank: a column-parallel layer all-reduces the gradient of its input
  in the backward, so their gradients are equal on every TP rank without a collective.

Logits are full-vocabulary on every rank, so the step's loss is the one-process loss.
:func:`pretrain.lego.parallelize.TensorParallelStep` runs the optimizer over this layout and
saves partitions and optimizer state in the one-process layout (:mod:`parallel.tensor`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from parallel.cpu_shims import apply_cpu_shims
from parallel.tensor import column_parallel_linear, parallel_layer_config, row_parallel_linear
from parallel.topology import Topology
from pretrain.config import ConfigError
from pretrain.models.lego_mt import LegoMT, LegoMTConfig
from pretrain.models.lego_mt.model import Attention, FeedForward


class TensorParallelAttention(nn.Module):
    """Multi-head attention over this rank's heads (the plain :class:`Attention`'s interface)."""

    def __init__(self, plain: Attention, topo: Topology) -> None:
        super().__init__()
        rank, size, group = topo.tp_rank, topo.tp, topo.tp_group
        cfg = parallel_layer_config(topo, False, plain.q.weight.dtype)
        self.n_heads = plain.n_heads // size
        self.head_dim = plain.q.out_features // plain.n_heads
        self.q = column_parallel_linear(plain.q, cfg, group, rank, size)
        self.k = column_parallel_linear(plain.k, cfg, group, rank, size)
        self.v = column_parallel_linear(plain.v, cfg, group, rank, size)
        self.o = row_parallel_linear(plain.o, cfg, group, rank, size)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(kv)), split(self.v(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class TensorParallelFeedForward(nn.Module):
    """``down(relu(up(x)))`` over this rank's FFN columns."""

    def __init__(self, plain: FeedForward, topo: Topology) -> None:
        super().__init__()
        rank, size, group = topo.tp_rank, topo.tp, topo.tp_group
        cfg = parallel_layer_config(topo, False, plain.up.weight.dtype)
        self.up = column_parallel_linear(plain.up, cfg, group, rank, size)
        self.down = row_parallel_linear(plain.down, cfg, group, rank, size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)))


def check_tensor_parallel_shape(cfg: LegoMTConfig, tp: int) -> None:
    """Raise ConfigError naming the field when ``cfg`` cannot be split ``tp`` ways."""
    for name in ("n_heads", "ffn_dim"):
        value = getattr(cfg, name)
        if value % tp:
            raise ConfigError(f"model.{name}={value} is not divisible by parallel.tp={tp}")


def apply_lego_tensor_parallel(model: LegoMT, topo: Topology) -> LegoMT:
    """Shard every attention and feed-forward block of ``model`` over ``topo.tp_group``, in place.

    Every TP rank must hold the same dense weights (the trainer loads the same partitions on every
    rank); each keeps its shard. ``requires_grad`` carries over from the dense parameters, so a
    stage's frozen parts stay frozen. Returns ``model``.
    """
    apply_cpu_shims()
    if topo.tp == 1:
        return model
    check_tensor_parallel_shape(model.cfg, topo.tp)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                swapped: nn.Module = TensorParallelAttention(child, topo)
            elif isinstance(child, FeedForward):
                swapped = TensorParallelFeedForward(child, topo)
            else:
                continue
            trainable = {n: p.requires_grad for n, p in child.named_parameters()}
            for n, p in swapped.named_parameters():
                p.requires_grad_(trainable[n])
            setattr(parent, name, swapped)
    return model
