"""Configuration of the TransNormerLLM decoder (arXiv 2307.14995).

Field names follow this platform's conventions; the Hugging Face ``config.json`` key each one
corresponds to is given in its docstring so checkpoints can be mapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from pretrain.config import Config

if TYPE_CHECKING:
    from pretrain.models.transnormer.model import TransNormerLLM


class TransNormerConfig(Config):
    """Shape and initialisation of a TransNormerLLM model."""

    vocab_size: int = Field(default=8000, gt=0)
    """Vocabulary size (HF ``vocab_size``)."""

    d_model: int = Field(default=256, gt=0)
    """Residual stream width ``d`` (HF ``decoder_embed_dim``)."""

    n_layers: int = Field(default=4, gt=0)
    """Number of decoder layers ``L`` (HF ``decoder_layers``)."""

    n_heads: int = Field(default=4, gt=0)
    """Attention heads ``H`` per layer (HF ``decoder_attention_heads``); must divide the GLA width."""

    hidden_dim: int | None = Field(default=None, gt=0)
    """Width of the gated linear attention (q, k, v, u each); ``None`` means ``d_model`` (HF ``hidden_dim``)."""

    glu_dim: int = Field(default=704, gt=0)
    """Inner width of the SGLU channel mixer (HF ``glu_dim``)."""

    lrpe_layers: list[int] = Field(default_factory=list)
    """0-based indices of the layers that use LRPE-d, which doubles their q/k width. HF
    ``linear_use_lrpe_list`` is instead a per-layer 0/1 list: layer ``i`` is listed here iff entry ``i`` is 1."""

    no_scale_embedding: bool = False
    """Do not multiply the token embeddings by ``sqrt(d_model)`` (HF ``no_scale_embedding``)."""

    tie_word_embeddings: bool = False
    """Share one matrix between the token embedding and the output projection ``lm_head``."""

    norm_eps: float = Field(default=1e-6, gt=0)
    """Epsilon of every SRMSNorm: ``x * rsqrt(mean(x^2) + eps)`` (the released ``SimpleRMSNorm`` uses 1e-6)."""

    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal init of every Linear and Embedding weight (HF ``init_std``)."""

    attention_block_size: int = Field(default=64, gt=0)
    """Block size ``B`` of the Lightning Attention-2 form used in training and prefill by the
    ``torch`` attention backend (the Triton kernels use their own block size). 64 was the fastest
    on the 2-core development CPU (see ``bench/bench_attention.py``)."""

    attention_backend: Literal["auto", "torch", "lightning", "fla"] = "auto"
    """Implementation of the linear attention in training and prefill: ``torch`` (plain PyTorch,
    any device), ``lightning`` (the authors' Triton kernels, ``pip install lightning-attn``),
    ``fla`` (flash-linear-attention's ``chunk_simple_gla``, ``pip install fla-core``), or ``auto``:
    on CUDA ``lightning`` if installed, else ``fla`` if installed, else ``torch``; on CPU ``torch``.
    All compute the same function; decoding always uses the recurrent form."""

    @property
    def gla_dim(self) -> int:
        """The resolved GLA width (``hidden_dim``, or ``d_model`` when unset)."""
        return self.d_model if self.hidden_dim is None else self.hidden_dim

    @property
    def head_dim(self) -> int:
        """Per-head width ``h`` of q, k and v (before LRPE doubling of q and k)."""
        return self.gla_dim // self.n_heads

    @model_validator(mode="after")
    def _check(self) -> TransNormerConfig:
        if self.gla_dim % self.n_heads:
            width = "hidden_dim" if self.hidden_dim is not None else "d_model (hidden_dim is unset)"
            raise ValueError(
                f"n_heads={self.n_heads} must divide the GLA width {width}={self.gla_dim}; change n_heads or hidden_dim"
            )
        bad = [i for i in self.lrpe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(
                f"lrpe_layers={self.lrpe_layers}: indices {bad} out of range for n_layers={self.n_layers}"
            )
        if len(set(self.lrpe_layers)) != len(self.lrpe_layers):
            raise ValueError(f"lrpe_layers={self.lrpe_layers} lists a layer twice")
        return self

    def build(self) -> TransNormerLLM:
        """Build the model on the current default device, with weights initialised."""
        from pretrain.models.transnormer.model import TransNormerLLM

        return TransNormerLLM(self)

    def _matmul_params(self) -> int:
        """Weights used in matmuls per token: all layers' projections plus ``lm_head``."""
        d, w, g = self.d_model, self.gla_dim, self.glu_dim
        per_layer = d * 4 * w + w * d + 3 * d * g
        return self.n_layers * per_layer + self.vocab_size * d

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters of the built model, computed from the shapes.

        Per layer: ``qkvu_proj`` ``4 w d``, ``out_proj`` ``w d``, SGLU ``3 d g`` and, in LRPE
        layers, ``theta`` ``w``; plus the embedding ``V d`` and, if untied, ``lm_head`` ``V d``.
        Norms have no parameters.

        Args:
            exclude_embeddings: Leave out the token-embedding table (for a tied model, the
                shared matrix; an untied ``lm_head`` is still counted).

        Returns:
            The parameter count, equal to ``sum(p.numel() for p in model.parameters())``.
        """
        lrpe = len(self.lrpe_layers) * self.gla_dim
        emb = self.vocab_size * self.d_model
        total = self._matmul_params() + lrpe  # includes one V x d matrix (lm_head)
        if not self.tie_word_embeddings:
            total += emb
        return total - emb if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward) at sequence length ``seq_len``.

        Forward, per token::

            2 * N_matmul  +  sum over layers of  H * (2 B h_qk + 2 B h_v + 2 h_qk h_v + 2 h_qk h_v)

        ``N_matmul`` counts every weight used in a matmul: each layer's ``qkvu_proj``,
        ``out_proj``, ``l1``, ``l2``, ``l3`` and the ``lm_head`` (the embedding lookup is free).
        The attention term is what the block algorithm computes: per head, ``Q K^T`` and the
        masked product with ``V`` over a full block of ``B = min(attention_block_size, seq_len)``
        tokens (``2 B h_qk + 2 B h_v``), the inter-block ``(Q * lambda^j) KV`` (``2 h_qk h_v``)
        and the state update ``K^T V`` (``2 h_qk h_v``), with ``h_v = h`` and ``h_qk = h``, or
        ``2 h`` in LRPE layers. Norms, activations and decay scalings are not counted.

        Args:
            seq_len: Training sequence length.

        Returns:
            FLOPs per token for one training step.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        B = min(self.attention_block_size, seq_len)
        h = self.head_dim
        attn = 0
        for i in range(self.n_layers):
            h_qk = 2 * h if i in self.lrpe_layers else h
            attn += self.n_heads * (2 * B * h_qk + 2 * B * h + 4 * h_qk * h)
        return 3.0 * (2 * self._matmul_params() + attn)
