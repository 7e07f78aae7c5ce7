"""TransNormerLLM decoder (arXiv 2307.14995) in plain PyTorch.

Pre-norm layers ``x += GLA(SRMSNorm(x)); x += SGLU(SRMSNorm(x))``, no softmax anywhere. Module
names follow the released Hugging Face layout (``model.embed_tokens``,
``model.layers.{i}.token_mixer.qkvu_proj`` ..., ``lm_head``) so weights map one to one.

Three ways to run it: :meth:`TransNormerLLM.forward` (training, block form),
:meth:`TransNormerLLM.prefill` (block form, returns the per-layer states) and
:meth:`TransNormerLLM.decode_step` (recurrent form, one token, constant cost per token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.transnormer.attention import linear_attention, linear_attention_step, slopes_for_layer
from pretrain.models.transnormer.config import TransNormerConfig
from pretrain.models.transnormer.kernels import triton_available


class SRMSNorm(nn.Module):
    """Simple RMSNorm ``x * rsqrt(mean(x^2, -1) + eps)``: no gain, computed in fp32.

    On CUDA tensors (with Triton installed) it runs the fused Triton kernels of
    :mod:`~pretrain.models.transnormer.kernels.srmsnorm_triton`; elsewhere the plain
    PyTorch expression, which is also their reference.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and triton_available():
            from pretrain.models.transnormer.kernels.srmsnorm_triton import srmsnorm_triton

            return srmsnorm_triton(x, self.eps)
        return self.forward_plain(x)

    def forward_plain(self, x: Tensor) -> Tensor:
        """The unfused PyTorch expression (any device)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class SGLU(nn.Module):
    """Simple GLU channel mixer ``l3(l1(x) * l2(x))``, no activation, no bias."""

    def __init__(self, d_model: int, glu_dim: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(d_model, glu_dim, bias=False)
        self.l2 = nn.Linear(d_model, glu_dim, bias=False)
        self.l3 = nn.Linear(glu_dim, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(self.l1(x) * self.l2(x))


class LRPE(nn.Module):
    """LRPE-d: ``x -> concat(x cos(theta p), x sin(theta p))`` at position ``p``, doubling the width.

    ``theta`` has shape ``(H, 1, h)`` and is initialised to ``10000 ** (-2 / (H h) * arange(H h))``.
    Applied to both q and k, the product ``q_s . k_t`` depends only on ``s - t``.
    """

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.theta = nn.Parameter(torch.empty(n_heads, 1, head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set ``theta`` to its initial formula."""
        width = self.n_heads * self.head_dim
        idx = torch.arange(width, device=self.theta.device, dtype=torch.float32)
        self.theta.copy_((10000.0 ** (-2.0 / width * idx)).view_as(self.theta))

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Encode positions ``offset, offset + 1, ...`` of ``x`` ``(b, H, n, h)``; returns ``(b, H, n, 2h)``."""
        pos = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        angle = self.theta.float() * pos[:, None]  # (H, n, h)
        xf = x.float()
        return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


class GatedLinearAttention(nn.Module):
    """GLA token mixer: ``out_proj(SRMSNorm(concat_heads(o)) * u)`` with ``o`` the decayed linear
    attention of ``silu(q)``, ``silu(k)`` (optionally LRPE-encoded) and ``v``."""

    def __init__(self, config: TransNormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.block_size = config.attention_block_size
        self.backend = config.attention_backend
        width = config.gla_dim
        self.qkvu_proj = nn.Linear(config.d_model, 4 * width, bias=False)
        self.out_proj = nn.Linear(width, config.d_model, bias=False)
        self.norm = SRMSNorm(config.norm_eps)
        self.lrpe = LRPE(config.n_heads, self.head_dim) if layer_idx in config.lrpe_layers else None
        self._slope_args = (config.n_heads, layer_idx, config.n_layers)
        self.slope: Tensor
        self.register_buffer("slope", slopes_for_layer(*self._slope_args), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GatedLinearAttention:
        # The decay rates are constants of the architecture: keep them exact and fp32 through
        # ``.to(dtype)`` casts and ``to_empty`` (meta-device init), which would otherwise round
        # or leave them uninitialised.
        super()._apply(fn, recurse)
        self.slope = slopes_for_layer(*self._slope_args).to(self.slope.device)
        return self

    @property
    def state_dim(self) -> int:
        """Key width of the recurrent state (``2h`` with LRPE, else ``h``)."""
        return 2 * self.head_dim if self.lrpe is not None else self.head_dim

    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x (b, n, d)`` -> ``q, k (b, H, n, h_qk)``, ``v (b, H, n, h)``, ``u (b, n, w)``."""
        b, n, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        q, k, v = (t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        return q, k, v, u

    def _output(self, o: Tensor, u: Tensor) -> Tensor:
        """``o (b, H, n, h)`` -> ``out_proj(SRMSNorm(concat_heads(o)) * u)`` of shape ``(b, n, d)``."""
        b, _, n, _ = o.shape
        o = o.transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(self.norm(o) * u)

    def forward(self, x: Tensor, *, return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Block-form mixing of ``x`` ``(b, n, d)`` from position 0; optionally also the final state."""
        q, k, v, u = self._project(x, 0)
        out = linear_attention(
            q, k, v, self.slope, backend=self.backend, block_size=self.block_size, return_state=return_state
        )
        if return_state:
            o, kv = out
            return self._output(o, u), kv
        return self._output(out, u)

    def step(self, x: Tensor, kv: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """Recurrent mixing of one token ``x`` ``(b, d)`` at position ``offset`` given state ``kv``."""
        q, k, v, u = self._project(x[:, None], offset)
        o, kv = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.slope, kv)
        return self._output(o[:, :, None], u)[:, 0], kv


class TransNormerLayer(nn.Module):
    """One pre-norm decoder layer: ``x += GLA(SRMSNorm(x)); x += SGLU(SRMSNorm(x))``."""

    def __init__(self, config: TransNormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.token_norm = SRMSNorm(config.norm_eps)
        self.token_mixer = GatedLinearAttention(config, layer_idx)
        self.channel_norm = SRMSNorm(config.norm_eps)
        self.channel_mixer = SGLU(config.d_model, config.glu_dim)

    def forward(self, x: Tensor, *, return_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        mixed = self.token_mixer(self.token_norm(x), return_state=return_state)
        if return_state:
            mixed, kv = mixed
        x = x + mixed
        x = x + self.channel_mixer(self.channel_norm(x))
        return (x, kv) if return_state else x

    def step(self, x: Tensor, kv: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        """One token ``x`` ``(b, d)`` through the recurrent form; returns ``(x, kv')``."""
        mixed, kv = self.token_mixer.step(self.token_norm(x), kv, offset)
        x = x + mixed
        return x + self.channel_mixer(self.channel_norm(x)), kv


class TransNormerModel(nn.Module):
    """Embedding, decoder layers and final norm (HF ``TransnormerModel``)."""

    def __init__(self, config: TransNormerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransNormerLayer(config, i) for i in range(config.n_layers))
        self.final_norm = SRMSNorm(config.norm_eps)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.d_model)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale


@dataclass
class InferenceState:
    """Decoding state: one fixed-size fp32 state per layer, no growing KV cache."""

    kv: list[Tensor]
    """Per layer ``(b, H, h_qk, h)`` fp32 state (``h_qk = 2h`` in LRPE layers)."""

    offset: int
    """Number of tokens consumed so far (the position of the next token, used by LRPE)."""


class TransNormerLLM(nn.Module):
    """TransNormerLLM causal language model (HF ``TransnormerForCausalLM``)."""

    def __init__(self, config: TransNormerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TransNormerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """``N(0, init_std)`` for every Linear and Embedding weight; LRPE ``theta`` to its formula.

        Args:
            generator: Optional random generator (on the parameters' device) for reproducible init.
        """
        self.tie_weights()
        std = self.config.init_std
        done: set[int] = set()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
                done.add(id(module.weight))
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, LRPE):
                module.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding matrix with ``lm_head`` when the config ties them. Called again by
        :meth:`init_weights` because ``to_empty`` (meta-device init) allocates each separately."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf(cls, path: str | Path, **kwargs: Any) -> TransNormerLLM:
        """Load a checkpoint in the released Hugging Face layout; see :func:`.hf.load_hf`."""
        from pretrain.models.transnormer.hf import load_hf

        return load_hf(path, **kwargs)

    def to_hf(self, path: str | Path, **kwargs: Any) -> Path:
        """Write this model in the released Hugging Face layout; see :func:`.hf.save_hf`."""
        from pretrain.models.transnormer.hf import save_hf

        return save_hf(self, path, **kwargs)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix counted once); see :meth:`TransNormerConfig.num_params`."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.model.embed_tokens.weight.numel() if exclude_embeddings else total

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(b, n, vocab)`` for token ids ``(b, n)`` (block form, positions from 0)."""
        x = self.model.embed(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.final_norm(x))

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, InferenceState]:
        """Run a prompt ``(b, n)`` with the block form and keep each layer's final state.

        Returns:
            ``(logits (b, n, vocab), state)``; continue with :meth:`decode_step`.
        """
        x = self.model.embed(input_ids)
        states = []
        for layer in self.model.layers:
            x, kv = layer(x, return_state=True)
            states.append(kv)
        return self.lm_head(self.model.final_norm(x)), InferenceState(kv=states, offset=input_ids.shape[1])

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, state: InferenceState) -> tuple[Tensor, InferenceState]:
        """Consume one token per sequence ``(b,)`` with the recurrent form.

        The cost per token does not depend on how many tokens came before. ``state`` is not
        modified; a new one is returned.

        Returns:
            ``(logits (b, vocab), new state)``.
        """
        x = self.model.embed(token_ids)
        new_kv = []
        for layer, kv in zip(self.model.layers, state.kv, strict=True):
            x, kv = layer.step(x, kv, state.offset)
            new_kv.append(kv)
        return self.lm_head(self.model.final_norm(x)), InferenceState(kv=new_kv, offset=state.offset + 1)

    def empty_state(self, batch_size: int) -> InferenceState:
        """A zero state (no context), to decode from scratch without a prefill."""
        p = self.lm_head.weight
        kv = [
            torch.zeros(batch_size, self.config.n_heads, layer.token_mixer.state_dim, self.config.head_dim,
                        device=p.device, dtype=torch.float32)
            for layer in self.model.layers
        ]  # fmt: skip
        return InferenceState(kv=kv, offset=0)
