"""Lego-MT in plain PyTorch: pre-norm transformer encoder/decoder stacks assembled into flows.

Parts (every one has the shape of one half of an M2M-100-style model):

* ``embed``: one token embedding shared by every part and tied to every output projection;
* ``main``: the multilingual main encoder; ``m2m``: the multilingual decoder;
* ``enc_branches[g]`` / ``dec_branches[g]``: an encoder and a decoder per language group.

Flows (bitmask, see :mod:`pretrain.models.lego_mt.flows`): Dec-Flow (1) = main -> dec[g],
Enc-Flow (2) = enc[g] -> m2m, Mix-Flow (4) = main -> m2m. Only the branches of *resident*
groups exist in the module, so localized training keeps the others on disk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.lego_mt.config import LegoMTConfig
from pretrain.models.lego_mt.flows import DEC, ENC, MIX, flow_names


def sinusoidal_positions(n: int, d: int) -> Tensor:
    """``(n, d)`` fairseq-style sinusoidal table: sin in the first half, cos in the second."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / max(1, half - 1)))
    angle = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    table = torch.cat([angle.sin(), angle.cos()], dim=1)
    return F.pad(table, (0, d - table.shape[1]))


class Attention(nn.Module):
    def __init__(self, cfg: LegoMTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        h = self.n_heads

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(kv)), split(self.v(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: LegoMTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.relu(self.up(x)))


class EncoderLayer(nn.Module):
    """``x += Drop(SelfAttn(LN(x))); x += Drop(FFN(LN(x)))``."""

    def __init__(self, cfg: LegoMTConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, src_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, FFN; all pre-norm."""

    def __init__(self, cfg: LegoMTConfig) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        h = self.self_norm(y)
        y = y + self.drop(self.self_attn(h, h, None, causal=True))
        y = y + self.drop(self.cross_attn(self.cross_norm(y), memory, src_mask))
        return y + self.drop(self.ffn(self.ffn_norm(y)))


class Stack(nn.Module):
    """Layers with layerdrop (training only) and a final LayerNorm."""

    def __init__(self, layers: list[nn.Module], cfg: LegoMTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layerdrop = cfg.layerdrop

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue
            x = layer(x, *args)
        return self.norm(x)


def encoder_stack(cfg: LegoMTConfig) -> Stack:
    return Stack([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)], cfg)


def decoder_stack(cfg: LegoMTConfig) -> Stack:
    return Stack([DecoderLayer(cfg) for _ in range(cfg.decoder_layers)], cfg)


class SharedEmbedding(nn.Module):
    """Token embedding (scaled by ``sqrt(d)``) + fixed sinusoidal positions; ``logits`` ties to it."""

    def __init__(self, cfg: LegoMTConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.scale = math.sqrt(cfg.d_model)
        self.register_buffer(
            "positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        n = ids.shape[1]
        x = self.tokens(ids) * self.scale
        return self.drop(x + self.positions[offset : offset + n].to(x.dtype))  # engines may cast params only

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.tokens.weight.t()


def source_mask(src: Tensor, pad_id: int) -> Tensor:
    """``(b, 1, 1, s)`` bool attention mask: True where the key is a real token."""
    return (src != pad_id)[:, None, None, :]


def init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def flow_loss(logits: Tensor, labels: Tensor, pad_id: int) -> Tensor:
    """Mean next-token cross-entropy over the non-pad labels, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id)


class LegoMT(nn.Module):
    """The multi-way model. ``forward(src, tgt_in, flows, group, labels=None)`` runs the selected
    flows and returns ``{"dec"|"enc"|"mix": {"logits", "loss"?}, "loss"?}`` (losses summed)."""

    def __init__(self, cfg: LegoMTConfig, *, resident: list[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = SharedEmbedding(cfg)
        self.main = encoder_stack(cfg)
        self.m2m = decoder_stack(cfg)
        self.enc_branches = nn.ModuleDict()
        self.dec_branches = nn.ModuleDict()
        init_weights(self, cfg.init_std)
        for g in resident:
            self.add_group(g)

    # ---- residency -------------------------------------------------------------------
    def _check_group(self, group: str) -> None:
        if group not in self.cfg.groups:
            raise KeyError(f"unknown group {group!r}; the config has {self.cfg.groups}")

    def add_group(self, group: str, *, from_shared: bool = True) -> None:
        """Make ``group``'s branches resident, initialised as copies of main / m2m."""
        self._check_group(group)
        enc, dec = encoder_stack(self.cfg), decoder_stack(self.cfg)
        if from_shared:
            enc.load_state_dict(self.main.state_dict())
            dec.load_state_dict(self.m2m.state_dict())
        self.enc_branches[group] = enc.to(self.embed.tokens.weight.device)
        self.dec_branches[group] = dec.to(self.embed.tokens.weight.device)

    def drop_group(self, group: str) -> None:
        """Remove ``group``'s branches from the module (after saving them elsewhere)."""
        del self.enc_branches[group]
        del self.dec_branches[group]

    @property
    def resident(self) -> list[str]:
        return list(self.enc_branches.keys())

    def encoder(self, name: str) -> Stack:
        """``"main"`` or a resident group's encoder branch."""
        if name == "main":
            return self.main
        self._check_group(name)
        if name not in self.enc_branches:
            raise KeyError(f"group {name!r} is not resident (resident: {self.resident})")
        return self.enc_branches[name]

    def decoder(self, name: str) -> Stack:
        """``"m2m"`` or a resident group's decoder branch."""
        if name == "m2m":
            return self.m2m
        self._check_group(name)
        if name not in self.dec_branches:
            raise KeyError(f"group {name!r} is not resident (resident: {self.resident})")
        return self.dec_branches[name]

    # ---- compute -----------------------------------------------------------------------
    def encode(self, encoder: str, src: Tensor) -> Tensor:
        return self.encoder(encoder)(self.embed(src), source_mask(src, self.cfg.pad_id))

    def decode(self, decoder: str, memory: Tensor, src: Tensor, tgt_in: Tensor) -> Tensor:
        hidden = self.decoder(decoder)(self.embed(tgt_in), memory, source_mask(src, self.cfg.pad_id))
        return self.embed.logits(hidden)

    def forward(
        self, src: Tensor, tgt_in: Tensor, flows: int, group: str, labels: Tensor | None = None
    ) -> dict[str, dict[str, Tensor] | Tensor]:
        names = flow_names(flows)
        out: dict[str, dict[str, Tensor] | Tensor] = {}
        main_memory = self.encode("main", src) if flows & (DEC | MIX) else None
        routes = {
            "dec": (DEC, lambda: self.decode(group, main_memory, src, tgt_in)),
            "enc": (ENC, lambda: self.decode("m2m", self.encode(group, src), src, tgt_in)),
            "mix": (MIX, lambda: self.decode("m2m", main_memory, src, tgt_in)),
        }
        total = None
        for name in names:
            logits = routes[name][1]()
            out[name] = {"logits": logits}
            if labels is not None:
                loss = flow_loss(logits, labels, self.cfg.pad_id)
                out[name]["loss"] = loss
                total = loss if total is None else total + loss
        if total is not None:
            out["loss"] = total
        return out


class LegoFlow(nn.Module):
    """One detached flow: shared embedding + one encoder + one decoder (a standalone model)."""

    def __init__(self, cfg: LegoMTConfig, *, encoder_name: str = "main", decoder_name: str = "m2m") -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_name = encoder_name
        self.decoder_name = decoder_name
        self.embed = SharedEmbedding(cfg)
        self.encoder = encoder_stack(cfg)
        self.decoder = decoder_stack(cfg)

    def encode(self, src: Tensor) -> Tensor:
        return self.encoder(self.embed(src), source_mask(src, self.cfg.pad_id))

    def decode(self, memory: Tensor, src: Tensor, tgt_in: Tensor) -> Tensor:
        hidden = self.decoder(self.embed(tgt_in), memory, source_mask(src, self.cfg.pad_id))
        return self.embed.logits(hidden)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(self.encode(src), src, tgt_in)


def detach(model: LegoMT, *, encoder: str, decoder: str) -> LegoFlow:
    """Copy one flow out of ``model``: ``encoder`` is ``"main"`` or a resident group, ``decoder``
    is ``"m2m"`` or a resident group. The result shares no storage with ``model``."""
    flow = LegoFlow(model.cfg, encoder_name=encoder, decoder_name=decoder)
    flow.embed.load_state_dict(model.embed.state_dict())
    flow.encoder.load_state_dict(model.encoder(encoder).state_dict())
    flow.decoder.load_state_dict(model.decoder(decoder).state_dict())
    return flow.to(model.embed.tokens.weight.device)
