"""Cleaning of short parallel messages: normalisation and pair filters."""

from __future__ import annotations

import re
import unicodedata

from pydantic import Field

from pretrain.config import Config

_SPACE = re.compile(r"\s+")
_MNEMONIC = re.compile(r"(?<![\w&_])[_&](?=\w)")  # "_File" / "&Open" keyboard accelerators
_PLACEHOLDER = re.compile(r"%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]|\{\w*\}")


class CleanConfig(Config):
    """Which pairs are kept."""

    min_chars: int = Field(default=2, ge=1)
    """Shortest side, in characters."""
    max_chars: int = Field(default=200, gt=0)
    """Longest side, in characters."""
    max_ratio: float = Field(default=3.0, ge=1)
    """Largest length ratio between the sides (characters, longer / shorter)."""
    single_line: bool = True
    """Drop messages that span several lines (help screens, tables)."""
    same_placeholders: bool = True
    """Drop pairs whose printf/brace placeholders differ in number."""


def normalize(text: str) -> str:
    """Drop control characters and accelerators, collapse whitespace; keeps newlines detectable by ``clean_pair``."""
    if not text.isprintable():  # (the per-character scan is the slow part; most text skips it)
        text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    text = _MNEMONIC.sub("", text.strip())
    return "\n".join(_SPACE.sub(" ", line).strip() for line in text.splitlines() if line.strip())


def clean_pair(src: str, tgt: str, cfg: CleanConfig) -> str | None:
    """``None`` if the pair is kept, else the name of the filter that dropped it."""
    if not src or not tgt:
        return "empty"
    if src == tgt:
        return "identical"
    if cfg.single_line and ("\n" in src or "\n" in tgt):
        return "multiline"
    if min(len(src), len(tgt)) < cfg.min_chars or max(len(src), len(tgt)) > cfg.max_chars:
        return "length"
    if max(len(src), len(tgt)) / min(len(src), len(tgt)) > cfg.max_ratio:
        return "ratio"
    if not any(c.isalpha() for c in src) or not any(c.isalpha() for c in tgt):
        return "no_letters"
    if cfg.same_placeholders and len(_PLACEHOLDER.findall(src)) != len(_PLACEHOLDER.findall(tgt)):
        return "placeholders"
    return None
