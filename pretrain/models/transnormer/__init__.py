"""TransNormerLLM: decoder with gated decayed linear attention (arXiv 2307.14995)."""

from pretrain.models.transnormer.attention import linear_attention
from pretrain.models.transnormer.config import TransNormerConfig
from pretrain.models.transnormer.model import InferenceState, TransNormerLLM

__all__ = ["InferenceState", "TransNormerConfig", "TransNormerLLM", "linear_attention"]
