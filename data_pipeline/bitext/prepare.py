"""Catalogs -> cleaned multi-way table -> language-centric groups -> joint tokenizer -> tokens.

Writes under ``out_dir``::

    pairs/<group>.jsonl     {"src_lang", "tgt_lang", "src", "tgt"} (text, training split)
    heldout.jsonl           the same, held-out messages (every direction)
    spm.model / spm.vocab   joint SentencePiece BPE with one ``<2xx>`` tag per language
    tok/<group>.jsonl       {"src_lang", "tgt_lang", "src": [ids], "tgt": [ids]}
    tok/meta.json           {"lang_tags", "eos_id", "pad_id", "groups", "tokenizer"}
    stats.json              pair counts per direction and drops per filter

A *language-centric* group holds the pairs whose source language belongs to it (one-to-many);
by default each language is its own group. The held-out split is by the English message, so
no held-out sentence is seen in training in any language.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from data_pipeline.bitext.clean import CleanConfig, clean_pair, normalize
from data_pipeline.bitext.gettext_pairs import LOCALE_ROOT, multiway_table
from data_pipeline.tokenizer import EOS_ID, PAD_ID, SentencePieceTokenizer, train_tokenizer
from pretrain.config import Config


def lang_tag(lang: str) -> str:
    return f"<2{lang}>"


class BitextConfig(Config):
    """Where the catalogs are, which languages and groups, and how pairs are cleaned and split."""

    langs: list[str] = Field(default_factory=lambda: ["en", "de", "fr", "es", "it", "pt"])
    """Languages (``/usr/share/locale`` directory names); ``en`` is the msgid side."""
    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Group name -> source languages; empty = one group per language, named after it."""
    locale_root: str = str(LOCALE_ROOT)
    """Root of the ``<lang>/LC_MESSAGES/*.mo`` catalogs."""
    clean: CleanConfig = Field(default_factory=CleanConfig)
    """Pair filters."""
    heldout_fraction: float = Field(default=0.02, ge=0, lt=1)
    """Share of English messages held out for evaluation."""
    max_pairs_per_direction: int | None = Field(default=None, gt=0)
    """Cap on training pairs per direction (first by English text order); ``None`` = all."""
    vocab_size: int = Field(default=8000, gt=0)
    """Joint SentencePiece vocabulary (tags and byte pieces included)."""
    seed: int = 0
    """Tokenizer sampling seed."""

    @model_validator(mode="after")
    def _check(self) -> BitextConfig:
        if "en" not in self.langs or len(self.langs) < 2:
            raise ValueError(f"langs must include 'en' and another language, got {self.langs}")
        seen = [lang for members in self.groups.values() for lang in members]
        if self.groups and sorted(seen) != sorted(self.langs):
            raise ValueError(f"groups must cover each of langs={self.langs} exactly once, got {self.groups}")
        return self

    def group_of(self) -> dict[str, str]:
        if not self.groups:
            return {lang: lang for lang in self.langs}
        return {lang: name for name, members in self.groups.items() for lang in members}


def _is_heldout(english: str, fraction: float) -> bool:
    return fraction > 0 and zlib.crc32(english.encode()) % 10_000 < fraction * 10_000


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_pairs(cfg: BitextConfig) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """``(train pairs per group, held-out pairs, stats)`` from the catalogs."""
    table = multiway_table(cfg.langs, normalize=normalize, root=Path(cfg.locale_root))
    group_of = cfg.group_of()
    groups: dict[str, list[dict]] = {name: [] for name in dict.fromkeys(group_of.values())}
    heldout: list[dict] = []
    drops: Counter = Counter()
    kept: Counter = Counter()
    for english, row in table.items():
        held = _is_heldout(english, cfg.heldout_fraction)
        for a in cfg.langs:
            for b in cfg.langs:
                if a == b or a not in row or b not in row:
                    continue
                why = clean_pair(row[a], row[b], cfg.clean)
                if why:
                    drops[why] += 1
                    continue
                direction = f"{a}-{b}"
                pair = {"src_lang": a, "tgt_lang": b, "src": row[a], "tgt": row[b]}
                if held:
                    heldout.append(pair)
                elif cfg.max_pairs_per_direction is None or kept[direction] < cfg.max_pairs_per_direction:
                    kept[direction] += 1
                    groups[group_of[a]].append(pair)
    stats = {"messages": len(table), "train_pairs": dict(sorted(kept.items())), "drops": dict(drops)}
    stats["heldout_pairs"] = len(heldout)
    return groups, heldout, stats


def prepare(cfg: BitextConfig, out_dir: Path) -> dict[str, Any]:
    """Run every step into ``out_dir``; returns the stats (also in ``stats.json``)."""
    out_dir = Path(out_dir)
    groups, heldout, stats = build_pairs(cfg)
    if not any(groups.values()):
        raise ValueError(f"no pairs for langs={cfg.langs} under {cfg.locale_root}")
    for name, pairs in groups.items():
        _write_jsonl(out_dir / "pairs" / f"{name}.jsonl", pairs)
    _write_jsonl(out_dir / "heldout.jsonl", heldout)
    sentences = sorted({p[side] for pairs in groups.values() for p in pairs for side in ("src", "tgt")})
    _write_jsonl(out_dir / "tokenizer_text.jsonl", [{"text": s} for s in sentences])
    tags = [lang_tag(lang) for lang in cfg.langs]
    model = train_tokenizer(
        [out_dir / "tokenizer_text.jsonl"],
        out_dir / "spm",
        vocab_size=cfg.vocab_size,
        user_symbols=tags,
        seed=cfg.seed,
    )
    tok = SentencePieceTokenizer(model)
    for name, pairs in groups.items():
        src_ids = tok.encode_batch([p["src"] for p in pairs])
        tgt_ids = tok.encode_batch([p["tgt"] for p in pairs])
        rows = [
            {"src_lang": p["src_lang"], "tgt_lang": p["tgt_lang"], "src": s, "tgt": t}
            for p, s, t in zip(pairs, src_ids, tgt_ids)
        ]
        _write_jsonl(out_dir / "tok" / f"{name}.jsonl", rows)
    meta = {
        "lang_tags": {lang: tok._sp.piece_to_id(lang_tag(lang)) for lang in cfg.langs},
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "groups": {name: [lang for lang, g in cfg.group_of().items() if g == name] for name in groups},
        "tokenizer": str(model.resolve()),
        "vocab_size": tok.vocab_size,
    }
    (out_dir / "tok" / "meta.json").write_text(json.dumps(meta, indent=1))
    stats["vocab_size"] = tok.vocab_size
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
