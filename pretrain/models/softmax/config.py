"""Configuration of the softmax-attention baseline: a Llama-style decoder of a chosen size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from pretrain.config import Config

if TYPE_CHECKING:
    from pretrain.models.softmax.model import SoftmaxLM


class SoftmaxConfig(Config):
    """Shape and initialisation of the softmax-attention (Llama-style) baseline."""

    vocab_size: int = Field(default=8000, gt=0)
    """Vocabulary size."""

    d_model: int = Field(default=256, gt=0)
    """Residual stream width ``d``."""

    n_layers: int = Field(default=4, gt=0)
    """Number of decoder layers ``L``."""

    n_heads: int = Field(default=4, gt=0)
    """Attention heads ``H``; must divide ``d_model`` into an even head width (RoPE rotates pairs)."""

    ffn_dim: int = Field(default=704, gt=0)
    """Inner width of the SwiGLU MLP ``down(silu(gate(x)) * up(x))``."""

    tie_word_embeddings: bool = False
    """Share one matrix between the token embedding and ``lm_head``."""

    norm_eps: float = Field(default=1e-6, gt=0)
    """Epsilon of every RMSNorm."""

    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary position embedding frequencies."""

    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal init of every Linear and Embedding weight."""

    @property
    def head_dim(self) -> int:
        """Per-head width ``h = d_model / n_heads``."""
        return self.d_model // self.n_heads

    @model_validator(mode="after")
    def _check(self) -> SoftmaxConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.head_dim % 2:
            raise ValueError(
                f"head width d_model / n_heads = {self.head_dim} must be even for RoPE; change n_heads"
            )
        return self

    def build(self) -> SoftmaxLM:
        """Build the model on the current default device, with weights initialised."""
        from pretrain.models.softmax.model import SoftmaxLM

        return SoftmaxLM(self)

    def _matmul_params(self) -> int:
        """Weights used in matmuls per token: every layer's projections plus ``lm_head``."""
        d = self.d_model
        return self.n_layers * (4 * d * d + 3 * d * self.ffn_dim) + self.vocab_size * d

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters of the built model, computed from the shapes.

        Per layer: ``qkv_proj`` ``3 d^2``, ``o_proj`` ``d^2``, SwiGLU ``3 d f``, two RMSNorm gains
        ``2 d``; the final norm ``d``; the embedding ``V d`` and, if untied, ``lm_head`` ``V d``.

        Args:
            exclude_embeddings: Leave out the token-embedding table.

        Returns:
            The count, equal to ``sum(p.numel() for p in model.parameters())``.
        """
        d, emb = self.d_model, self.vocab_size * self.d_model
        total = self._matmul_params() + self.n_layers * 2 * d + d
        if not self.tie_word_embeddings:
            total += emb
        return total - emb if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

        ``6 * N_matmul + 12 * L * d * seq_len``: the weights used in matmuls (projections and
        ``lm_head``), plus ``Q K^T`` and ``P V`` over the whole ``seq_len x seq_len`` score
        matrix per layer (the PaLM / torchtitan convention; the causal half is not discounted).

        Args:
            seq_len: Training sequence length.

        Returns:
            FLOPs per token for one training step.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        return 6.0 * self._matmul_params() + 12.0 * self.n_layers * self.d_model * seq_len
