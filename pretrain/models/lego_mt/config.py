"""Configuration of Lego-MT: one encoder/decoder branch per language group, a multilingual
main encoder and a multilingual m2m decoder, all on the same transformer block shape."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from pretrain.config import Config

if TYPE_CHECKING:
    from pretrain.models.lego_mt.model import LegoMT


class LegoMTConfig(Config):
    """Shape of every Lego-MT part (each branch has the shape of one M2M-100-style model half)."""

    vocab_size: int = Field(default=8000, gt=0)
    """Joint SentencePiece vocabulary (language tags ``<2xx>`` included), shared by all parts."""

    d_model: int = Field(default=256, gt=0)
    """Residual width ``d``."""

    n_heads: int = Field(default=4, gt=0)
    """Attention heads; must divide ``d_model``."""

    ffn_dim: int = Field(default=1024, gt=0)
    """Inner width of the ReLU feed-forward block."""

    encoder_layers: int = Field(default=2, gt=0)
    """Layers of the main encoder and of every encoder branch."""

    decoder_layers: int = Field(default=2, gt=0)
    """Layers of the m2m decoder and of every decoder branch."""

    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout on attention outputs, FFN outputs and embeddings (training only)."""

    layerdrop: float = Field(default=0.0, ge=0, lt=1)
    """Probability of skipping each layer during training (M2M-100 uses 0.05)."""

    max_positions: int = Field(default=1024, gt=0)
    """Longest sequence the sinusoidal position table covers."""

    norm_eps: float = Field(default=1e-5, gt=0)
    """Epsilon of every LayerNorm."""

    pad_id: int = Field(default=0, ge=0)
    """Padding token id (masked out of attention keys and of the loss)."""

    groups: list[str] = Field(default_factory=lambda: ["en", "de"])
    """Language-group names; one encoder branch and one decoder branch each."""

    init_std: float = Field(default=0.02, gt=0)
    """Std of the normal initialisation of linear and embedding weights."""

    @model_validator(mode="after")
    def _check(self) -> LegoMTConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must be non-empty and unique, got {self.groups}")
        for g in self.groups:
            if g in ("main", "m2m") or not g.replace("_", "").isalnum():
                raise ValueError(f"group name {g!r}: use letters/digits/_ and not 'main'/'m2m'")
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} must be < vocab_size={self.vocab_size}")
        return self

    def build(self, *, resident: list[str] | None = None) -> LegoMT:
        """The model with the branches of ``resident`` groups (default: all groups)."""
        from pretrain.models.lego_mt.model import LegoMT

        return LegoMT(self, resident=self.groups if resident is None else resident)

    def shape_diff(self, other: LegoMTConfig) -> dict[str, tuple[object, object]]:
        """``{field: (self's, other's)}`` over the fields that fix the weights' shapes and meaning
        (dropout, layerdrop and the group list may differ between models that share weights)."""
        fields = ("vocab_size", "d_model", "n_heads", "ffn_dim", "encoder_layers", "decoder_layers", "pad_id")
        return {
            f: (getattr(self, f), getattr(other, f)) for f in fields if getattr(self, f) != getattr(other, f)
        }

    def num_params_per_part(self) -> dict[str, int]:
        """Parameters of the shared embedding, one encoder and one decoder (analytic)."""
        d, f = self.d_model, self.ffn_dim
        enc_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        dec_layer = enc_layer + 4 * d * d + 4 * d + 2 * d
        return {
            "embed": self.vocab_size * d,
            "encoder": self.encoder_layers * enc_layer + 2 * d,
            "decoder": self.decoder_layers * dec_layer + 2 * d,
        }


def tiny(groups: list[str] | None = None, vocab_size: int = 320) -> LegoMTConfig:
    """Tiny preset for tests: d=32, 1+1 layers."""
    return LegoMTConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_heads=4,
        ffn_dim=64,
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.0,
        groups=groups or ["en", "de"],
    )


def m2m_1_2b(groups: list[str]) -> LegoMTConfig:
    """M2M-100-1.2B shape per branch: 24+24 layers, d=1024, FFN 8192, 16 heads, 128K vocab."""
    return LegoMTConfig(
        vocab_size=128_112,
        d_model=1024,
        n_heads=16,
        ffn_dim=8192,
        encoder_layers=24,
        decoder_layers=24,
        dropout=0.1,
        layerdrop=0.05,
        groups=groups,
    )
