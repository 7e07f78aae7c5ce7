"""TransNormerLLM (arXiv 2307.14995) for Hugging Face ``transformers`` (``trust_remote_code``).

Shipped with checkpoints exported by this platform; self-contained (torch + transformers only).
Weight names follow the released layout (``model.layers.{i}.token_mixer.qkvu_proj.weight`` ...).

Layer: ``x += GLA(SRMSNorm(x)); x += SGLU(SRMSNorm(x))``. GLA: ``q, k = silu``, v and u linear,
optional LRPE on q and k, decayed causal linear attention
``o_s = sum_{t<=s} (q_s . k_t) lambda^(s-t) v_t`` with ``lambda = exp(-slope)`` per head (no
``1/sqrt(h)`` scaling), then ``out_proj(SRMSNorm(concat_heads(o)) * u)``. This file computes the
attention in its quadratic masked form (exact, memory ``O(n^2)`` per head); no decoding cache.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_transnormer import TransnormerConfig

NORM_EPS = 1e-6


def _alibi_slopes(n):
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * j / n) for j in range(1, n + 1)]
    closest = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def _layer_slopes(n_heads, layer_idx, n_layers):
    factor = 1.0 + 1e-5 if n_layers == 1 else 1.0 - layer_idx / (n_layers - 1) + 1e-5
    return torch.tensor([s * factor for s in _alibi_slopes(n_heads)], dtype=torch.float32)


class SimpleRMSNorm(nn.Module):
    def __init__(self, eps=NORM_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Lrpe(nn.Module):
    def __init__(self, n_heads, head_dim):
        super().__init__()
        self.theta = nn.Parameter(torch.empty(n_heads, 1, head_dim))
        width = n_heads * head_dim
        with torch.no_grad():
            self.theta.copy_((10000.0 ** (-2.0 / width * torch.arange(width).float())).view_as(self.theta))

    def forward(self, x):
        pos = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angle = self.theta.float() * pos[:, None]
        xf = x.float()
        return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


class NormLinearAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_heads = config.decoder_attention_heads
        self.head_dim = config.hidden_dim // self.n_heads
        self.qkvu_proj = nn.Linear(config.decoder_embed_dim, 4 * config.hidden_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_dim, config.decoder_embed_dim, bias=config.bias)
        self.norm = SimpleRMSNorm()
        flags = config.linear_use_lrpe_list
        self.lrpe = Lrpe(self.n_heads, self.head_dim) if flags and flags[layer_idx] else None
        self.register_buffer(
            "slope", _layer_slopes(self.n_heads, layer_idx, config.decoder_layers), persistent=False
        )
        self._slope_args = (self.n_heads, layer_idx, config.decoder_layers)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        q, k, v = (t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.lrpe is not None:
            q, k = self.lrpe(q), self.lrpe(k)
        # The slopes are architecture constants: recompute them (buffers may come from meta/bf16).
        slope = _layer_slopes(*self._slope_args).to(x.device)
        idx = torch.arange(n, device=x.device)
        diff = (idx[:, None] - idx[None, :]).float()
        decay = torch.exp(-slope[:, None, None] * diff.clamp(min=0))
        decay = decay.masked_fill(diff[None] < 0, 0.0)  # (H, n, n)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * decay
        o = torch.matmul(scores, v.float()).to(x.dtype)
        o = o.transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(self.norm(o) * u)


class GLU(nn.Module):
    def __init__(self, d, glu_dim, bias):
        super().__init__()
        self.l1 = nn.Linear(d, glu_dim, bias=bias)
        self.l2 = nn.Linear(d, glu_dim, bias=bias)
        self.l3 = nn.Linear(glu_dim, d, bias=bias)

    def forward(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TransnormerDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        glu_dim = config.decoder_embed_dim if config.glu_dim == -1 else config.glu_dim
        self.token_norm = SimpleRMSNorm()
        self.token_mixer = NormLinearAttention(config, layer_idx)
        self.channel_norm = SimpleRMSNorm()
        self.channel_mixer = GLU(config.decoder_embed_dim, glu_dim, config.bias)

    def forward(self, x):
        x = x + self.token_mixer(self.token_norm(x))
        return x + self.channel_mixer(self.channel_norm(x))


class TransnormerPreTrainedModel(PreTrainedModel):
    config_class = TransnormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransnormerDecoderLayer"]  # noqa: RUF012

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class TransnormerModel(TransnormerPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.layers = nn.ModuleList(TransnormerDecoderLayer(config, i) for i in range(config.decoder_layers))
        self.final_norm = SimpleRMSNorm()
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        x = self.embed_tokens(input_ids) * self.embed_scale if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


class TransnormerForCausalLM(TransnormerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config):
        super().__init__(config)
        self.model = TransnormerModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # No decoding cache: every step recomputes the whole (short) prefix.
        return {"input_ids": input_ids}

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                return_dict=None, **kwargs):  # fmt: skip
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
