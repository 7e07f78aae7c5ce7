"""The ``selfclean`` section of a data run: the self-cleaning loop's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pretrain.config import Config


class SelfCleanConfig(Config):
    """Score every document with a small evaluation model and drop the least likely ones, in rounds."""

    enabled: bool = True
    """Run the self-cleaning loop (``False`` passes the cleaned documents straight on)."""
    rounds: int = Field(1, ge=1)
    """Rounds of score -> threshold -> split; each round scores the previous round's kept documents."""
    quantile: float | None = Field(0.95, gt=0.0, le=1.0)
    """Keep documents whose perplexity is at most this quantile of the round's perplexities
    (0.95 drops the most perplexing ~5%); ``None`` when ``max_perplexity`` is used."""
    max_perplexity: float | None = Field(None, gt=0.0)
    """Absolute threshold: drop documents whose perplexity is above it (set ``quantile: null``)."""
    eval_model: str | None = None
    """A checkpoint, checkpoints directory or run directory trained by this platform, used in every
    round; ``None`` trains one on the data itself (see ``train_config``)."""
    retrain: bool = True
    """With ``eval_model: null``: train a fresh evaluation model each round on that round's input
    (the previous round's kept documents); ``False`` trains once in round 1 and reuses it."""
    train_config: str = "configs/tnl-tiny.yaml"
    """Run config (a YAML path or a preset name such as ``tnl-tiny``) of the evaluation model; its
    data paths, tokenizer and run directory are set by the loop, its ``model.vocab_size`` sizes the
    evaluation tokenizer."""
    train_overrides: list[str] = Field(default_factory=list)
    """``--set`` style overrides applied to ``train_config`` (e.g. ``train.steps=100``)."""
    window: int | None = Field(None, ge=2)
    """Tokens per scored window; ``None`` uses the evaluation model's training ``data.seq_len``.
    A longer document is cut into consecutive windows, each scored from an empty state."""
    max_tokens: int | None = Field(None, ge=1)
    """Score only the first this many tokens of a document (``None``: all of it)."""
    batch_windows: int = Field(16, ge=1)
    """Windows per forward pass (windows of similar length are batched, right-padded, masked)."""
    threads: int = Field(1, ge=1)
    """torch threads per scoring task."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Where each task runs the evaluation model."""
    review_samples: int = Field(20, ge=0)
    """Kept and dropped documents (each) written with their scores for people to review."""
    review_chars: int = Field(600, ge=1)
    """Characters of each review document kept in the review files and report."""
    histogram_bins: int = Field(60, ge=5)
    """Bins of the perplexity histogram (log scale)."""
    seed: int = 0
    """Seed of the review samples."""

    @model_validator(mode="after")
    def _one_threshold(self) -> SelfCleanConfig:
        if (self.quantile is None) == (self.max_perplexity is None):
            raise ValueError(
                "set exactly one of selfclean.quantile and selfclean.max_perplexity (set the other to null)"
            )
        return self
