"""Softmax-attention baseline in plain PyTorch: a Llama-style decoder.

Pre-norm layers ``x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))`` with rotary position
embeddings and ``F.scaled_dot_product_attention``. Same interface as
:class:`pretrain.models.transnormer.TransNormerLLM`: ``forward`` (training), ``prefill`` and
``decode_step``, but decoding keeps a KV cache that grows with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.softmax.config import SoftmaxConfig


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain: ``w * x * rsqrt(mean(x^2, -1) + eps)``, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(
    head_dim: int, offset: int, n: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``(n, head_dim)`` for positions ``offset .. offset + n - 1``.

    Frequencies ``theta^(-2i/h)`` for ``i < h/2``, repeated for both halves (rotate-half layout).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    angle = pos[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(b, H, n, h)``: ``x cos + rotate_half(x) sin`` with ``rotate_half = (-x2, x1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Decoding state: per-layer key and value buffers that grow with the context.

    The buffers have room for ``capacity`` tokens, of which the first ``offset`` are filled;
    :meth:`SoftmaxLM.decode_step` writes into them in place (doubling them when full), so only
    the most recently returned cache should be decoded from.
    """

    k: list[Tensor]
    """Per layer ``(b, H, capacity, h)`` keys (after RoPE)."""

    v: list[Tensor]
    """Per layer ``(b, H, capacity, h)`` values."""

    offset: int
    """Number of tokens cached (the position of the next token)."""

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of the filled part of the cache (what a cache of exactly ``offset`` tokens holds)."""
        per_token = sum(t[:, :, :1].numel() * t.element_size() for t in (*self.k, *self.v))
        return per_token * self.offset


class Attention(nn.Module):
    """Multi-head causal softmax attention with RoPE (fused q/k/v projection)."""

    def __init__(self, config: SoftmaxConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x (b, n, d)`` -> ``q, k, v`` each ``(b, H, n, h)``, q and k rotated."""
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused in one projection."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """``x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))``."""

    def __init__(self, config: SoftmaxConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, i: int) -> Tensor:
        """Tokens ``x (b, m, d)`` at positions ``cache.offset ..``, attending to the cache; writes
        their keys and values into layer ``i``'s buffers (which must have room)."""
        start, m = cache.offset, x.shape[1]
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        cache.k[i][:, :, start : start + m] = k
        cache.v[i][:, :, start : start + m] = v
        keys, values = cache.k[i][:, :, : start + m], cache.v[i][:, :, : start + m]
        if m == 1:
            o = F.scaled_dot_product_attention(q, keys, values)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # a chunk after cached tokens: query j sees keys up to start + j
            allowed = torch.ones(m, start + m, dtype=torch.bool, device=x.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        x = x + self.self_attn.out(o)
        return x + self.mlp(self.post_attention_layernorm(x))


class SoftmaxModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: SoftmaxConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class SoftmaxLM(nn.Module):
    """Llama-style causal language model, the softmax-attention baseline of TransNormerLLM."""

    def __init__(self, config: SoftmaxConfig) -> None:
        super().__init__()
        self.config = config
        self.model = SoftmaxModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """``N(0, init_std)`` for every Linear and Embedding weight, ones for the norm gains.

        Args:
            generator: Optional random generator (on the parameters' device) for reproducible init.
        """
        done: set[int] = set()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
                done.add(id(module.weight))
                module.weight.normal_(0.0, self.config.init_std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def _rope(self, offset: int, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(self.config.head_dim, offset, n, self.config.rope_theta, device)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(b, n, vocab)`` for token ids ``(b, n)`` (positions from 0)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(0, input_ids.shape[1], x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def empty_state(self, batch_size: int, capacity: int = 256) -> KVCache:
        """An empty cache with room for ``capacity`` tokens (it grows when needed)."""
        p = self.lm_head.weight
        shape = (batch_size, self.config.n_heads, capacity, self.config.head_dim)
        n = self.config.n_layers
        k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(n)]
        v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(n)]
        return KVCache(k=k, v=v, offset=0)

    @staticmethod
    def _reserve(cache: KVCache, needed: int) -> KVCache:
        """A cache sharing ``cache``'s buffers, or copies of them at least twice as large if
        ``needed`` tokens do not fit."""
        if needed <= cache.capacity:
            return KVCache(k=cache.k, v=cache.v, offset=cache.offset)
        cap = max(needed, 2 * cache.capacity)

        def grow(t: Tensor) -> Tensor:
            out = t.new_zeros(*t.shape[:2], cap, t.shape[3])
            out[:, :, : cache.offset] = t[:, :, : cache.offset]
            return out

        return KVCache(k=[grow(t) for t in cache.k], v=[grow(t) for t in cache.v], offset=cache.offset)

    @torch.no_grad()
    def _extend(self, input_ids: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        x = self.model.embed_tokens(input_ids)
        m = input_ids.shape[1]
        cache = self._reserve(cache, cache.offset + m)
        cos, sin = self._rope(cache.offset, m, x.device)
        for i, layer in enumerate(self.model.layers):
            x = layer.cached(x, cos, sin, cache, i)
        cache.offset += m
        return self.lm_head(self.model.norm(x)), cache

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, KVCache]:
        """Run a prompt ``(b, n)`` and fill the KV cache.

        Args:
            input_ids: Prompt token ids.
            chunk_size: Process the prompt in chunks of this many tokens (each attends to the
                cache of the earlier ones), bounding the score matrix at ``chunk x n``.

        Returns:
            ``(logits (b, n, vocab), cache)``; continue with :meth:`decode_step`.
        """
        b, n = input_ids.shape
        cache = self.empty_state(b, capacity=max(n + 256, 256))
        chunk = chunk_size or max(n, 1)
        outs = []
        for start in range(0, n, chunk):
            logits, cache = self._extend(input_ids[:, start : start + chunk], cache)
            outs.append(logits)
        return torch.cat(outs, dim=1), cache

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """Consume one token per sequence ``(b,)``, attending to every cached token.

        The cost per token grows with the context (the whole cache is read). The returned cache
        shares (or replaces) the buffers of ``state``, which is written in place.

        Returns:
            ``(logits (b, vocab), new cache)``.
        """
        logits, cache = self._extend(token_ids[:, None], state)
        return logits[:, 0], cache
