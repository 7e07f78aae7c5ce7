"""Pairs (gettext catalogs or TSV/JSONL files) -> datatrove pipeline (clean, language check,
language-centric groups) -> joint tokenizer -> tokenized pairs.

Writes under ``out_dir``::

    pairs/<group>.jsonl     {"src_lang", "tgt_lang", "src", "tgt"} (text, training split)
    heldout.jsonl           the same, held-out messages (every direction)
    spm.model / spm.vocab   joint SentencePiece BPE with one ``<2xx>`` tag per language
    tok/<group>.jsonl       {"src_lang", "tgt_lang", "src": [ids], "tgt": [ids]}
    tok/meta.json           {"lang_tags", "eos_id", "pad_id", "groups", "tokenizer"}
    stats.json              pair counts per direction, drops per filter, quarantined lines
    quarantine/, dropped/language/, logs/bitext/   (see :mod:`data_pipeline.bitext.pipeline`)

A *language-centric* group holds the pairs whose source language belongs to it (one-to-many);
by default each language is its own group. Every pair is written in both directions. The
held-out split is by the English side (for gettext, the English message), so no held-out
sentence is seen in training in any language.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.bitext.config import BitextConfig, BitextInput, LanguageCheckConfig
from data_pipeline.bitext.pipeline import build_pairs
from data_pipeline.executors import ExecutorFactory
from data_pipeline.tokenizer import EOS_ID, PAD_ID, SentencePieceTokenizer, train_tokenizer

__all__ = ["BitextConfig", "BitextInput", "LanguageCheckConfig", "build_pairs", "lang_tag", "prepare"]


def lang_tag(lang: str) -> str:
    """The target-language tag token of ``lang`` (``<2de>``)."""
    return f"<2{lang}>"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(
    cfg: BitextConfig, out_dir: Path, *, executor_factory: ExecutorFactory | None = None
) -> dict[str, Any]:
    """Run every step into ``out_dir``; returns the stats (also in ``stats.json``).

    Raises:
        ValueError: no pair survived (or a TSV input names no languages).
        FileNotFoundError: an input does not exist.
    """
    out_dir = Path(out_dir)
    groups, heldout, stats = build_pairs(cfg, out_dir, executor_factory=executor_factory)
    if not any(groups.values()):
        source = [i.path for i in cfg.inputs] if cfg.inputs else cfg.locale_root
        raise ValueError(f"no pairs for langs={cfg.langs} from {source}; see {out_dir / 'logs' / 'bitext'}")
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
