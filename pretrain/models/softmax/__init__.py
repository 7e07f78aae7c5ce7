"""Softmax-attention baseline: a Llama-style decoder (RMSNorm, SwiGLU, RoPE, SDPA) with a KV cache."""

from pretrain.models.softmax.config import SoftmaxConfig
from pretrain.models.softmax.model import KVCache, SoftmaxLM

__all__ = ["KVCache", "SoftmaxConfig", "SoftmaxLM"]
