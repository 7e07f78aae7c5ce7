"""Streaming text generation for TransNormerLLM: block-form prefill, then recurrent decoding.

The prompt is consumed once with the block (Lightning Attention-2) form; every new token then
costs one :meth:`TransNormerLLM.decode_step`, whose cost and memory do not grow with the context.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from pretrain.models.transnormer import TransNormerLLM


@dataclass
class SamplingConfig:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Most tokens to generate (a stop token ends generation earlier)."""

    temperature: float = 1.0
    """Softmax temperature (> 0); ignored when ``greedy``."""

    top_k: int = 0
    """Sample only among the ``top_k`` most likely tokens; 0 disables the filter."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``
    (the most likely token is always kept, so 0 behaves like greedy); 1 disables the filter."""

    greedy: bool = False
    """Always take the most likely token (no randomness)."""

    seed: int = 0
    """Seed of the local random generator: the same seed, model and prompt give the same tokens."""

    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation; the stop token itself is not yielded."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or set greedy=True), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set the logits of tokens outside the top-k / nucleus to ``-inf`` (``logits`` is 1-D)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) > top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def _next_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    logits = logits.float()
    if sampling.greedy:
        return int(torch.argmax(logits))
    logits = _filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: TransNormerLLM, prompt_ids: list[int], sampling: SamplingConfig) -> Iterator[int]:
    """Generate tokens after ``prompt_ids``, yielding each id as soon as it is chosen.

    Args:
        model: The language model (its mode and weights are not changed).
        prompt_ids: Non-empty prompt token ids, each in ``[0, vocab_size)``.
        sampling: Sampling settings.

    Yields:
        New token ids, at most ``sampling.max_new_tokens``; generation ends before a stop token.

    Raises:
        ValueError: On an empty prompt or an id outside the vocabulary.
    """
    vocab = model.config.vocab_size
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty; generation needs at least one prompt token (e.g. a BOS id)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids contains ids outside [0, {vocab}): {bad[:5]}")
    return _generate(model, list(prompt_ids), sampling)


def _generate(model: TransNormerLLM, prompt_ids: list[int], sampling: SamplingConfig) -> Iterator[int]:
    if sampling.max_new_tokens == 0:
        return
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    stop = set(sampling.stop_token_ids)

    logits, state = model.prefill(torch.tensor([prompt_ids], dtype=torch.long, device=device))
    last = logits[0, -1]
    for i in range(sampling.max_new_tokens):
        token = _next_token(last, sampling, generator)
        if token in stop:
            return
        yield token
        if i + 1 < sampling.max_new_tokens:
            step_logits, state = model.decode_step(
                torch.tensor([token], dtype=torch.long, device=device), state
            )
            last = step_logits[0]
