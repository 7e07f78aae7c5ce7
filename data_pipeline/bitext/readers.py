"""datatrove readers of parallel text: TSV/JSONL pair files (bad lines quarantined, never fatal)
and the gettext catalogs.

A pair is a datatrove :class:`Document`: ``text`` is the source side, ``metadata`` holds
``src_lang``, ``tgt_lang`` and ``tgt``, plus two internal keys: ``_dp_order`` (source index,
record index: the order the grouping step restores) and, for gettext, ``_dp_pivot`` (the English
message, which decides the held-out split).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_pipeline.bitext.clean import normalize
from data_pipeline.bitext.config import LANG_CODE, TSV, BitextInput
from data_pipeline.bitext.gettext_pairs import multiway_table
from data_pipeline.jsonl import open_binary
from data_pipeline.steps.readers import JSONL, QuarantiningReader, _is_binary, decode_line, parse_json_object

ORDER_KEY = "_dp_order"
PIVOT_KEY = "_dp_pivot"
#: Set on pairs whose sides are already normalised (the gettext table votes on normalised text).
NORMALIZED_KEY = "_dp_normalized"

Pair = tuple[str, str, str, str]
"""``(src_lang, tgt_lang, src, tgt)``."""


def pair_document(
    doc_id: str, pair: Pair, *, order: tuple[int, int], pivot: str | None = None, normalized: bool = False
) -> Document:
    """One pair as a datatrove document (see the module docstring)."""
    src_lang, tgt_lang, src, tgt = pair
    metadata: dict[str, Any] = {"src_lang": src_lang, "tgt_lang": tgt_lang, "tgt": tgt}
    metadata[ORDER_KEY] = list(order)
    if pivot is not None:
        metadata[PIVOT_KEY] = pivot
    if normalized:
        metadata[NORMALIZED_KEY] = True
    return Document(text=src, id=doc_id, metadata=metadata)


def pair_of(doc: Document) -> Pair:
    """``(src_lang, tgt_lang, src, tgt)`` of a pair document."""
    m = doc.metadata
    return m["src_lang"], m["tgt_lang"], doc.text, m["tgt"]


def tsv_header(line: bytes) -> tuple[str, str] | None:
    """The two language codes of a TSV header line (``en<TAB>de``), else ``None``."""
    text, _, _ = decode_line(line)
    fields = (text or "").rstrip("\r\n").split("\t")
    if len(fields) == 2 and all(LANG_CODE.match(f) for f in fields):
        return fields[0], fields[1]
    return None


Parsed = tuple[Pair | None, str, str]


class BitextFileReader(QuarantiningReader):
    """Read pairs from TSV and JSONL files (formats in :mod:`data_pipeline.bitext.config`).

    A bad line is quarantined to ``quarantine_dir/<rank>.jsonl`` with its reason, file, line,
    detail and a raw preview (as :class:`~data_pipeline.steps.readers.QuarantiningReader` does),
    counted as ``quarantined_<reason>``, and reading goes on: ``line_too_long``,
    ``invalid_utf8``, ``binary_content``, ``invalid_json``, ``not_an_object``, ``wrong_columns``
    (TSV without exactly two tab-separated fields), ``missing_field`` / ``non_string_field``
    (a side absent or not a string), ``missing_language`` / ``bad_language``,
    ``invalid_unicode``, ``unreadable_file`` (corrupt gzip/zstd). Blank lines are ``dropped``.
    Counts ``in == kept + dropped + quarantined``; a skipped TSV header counts as ``header``.

    Task ``rank`` of ``world_size`` reads the lines whose index is ``rank`` modulo ``world_size``.

    Args:
        inputs: the files with their formats and declared languages (a TSV needs languages).
        quarantine_dir: where quarantine files are written.
        max_record_bytes: longer lines are quarantined unparsed.
        first_source: ``_dp_order`` source index of the first input (later ones count up).
    """

    name = "📖 bitext reader"

    def __init__(
        self,
        inputs: list[BitextInput],
        quarantine_dir: str | Path,
        *,
        max_record_bytes: int = 1 << 20,
        max_control_frac: float = 0.1,
        first_source: int = 1,
    ) -> None:
        super().__init__(
            [i.path for i in inputs],
            quarantine_dir,
            formats=[JSONL] * len(inputs),
            max_record_bytes=max_record_bytes,
            max_control_frac=max_control_frac,
        )
        self.inputs = list(inputs)
        self.first_source = first_source

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield one pair document per good line of this task's shard."""
        if data:
            yield from data
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        with open(self.quarantine_dir / f"{rank:05d}.jsonl", "w", encoding="utf-8") as qout:
            for idx, spec in enumerate(self.inputs):
                yield from self._read_pairs(spec, idx, qout, rank, world_size)

    def _read_pairs(
        self, spec: BitextInput, idx: int, qout: IO[str], rank: int, world_size: int
    ) -> Iterator[Document]:
        name, line_no = Path(spec.path).name, 0
        try:
            with open_binary(spec.path) as f:
                for line_no, (line, too_long) in enumerate(self._lines(f), 1):
                    if (line_no - 1) % world_size != rank:
                        continue
                    if line_no == 1 and spec.format == TSV and tsv_header(line) == spec.langs:
                        self.stat_update("header")
                        continue
                    self.stat_update("in")
                    if too_long:
                        detail = f"line longer than {self.max_record_bytes} bytes"
                        self._quarantine(qout, "line_too_long", spec.path, line_no, detail, line)
                        continue
                    if not line.strip():
                        self.stat_update("dropped", "dropped_blank_line")
                        continue
                    with self.track_time():
                        pair, reason, detail = self._parse_pair(line, spec)
                    if pair is None:
                        self._quarantine(qout, reason, spec.path, line_no, detail, line)
                        continue
                    self.stat_update("kept")
                    yield pair_document(f"{name}:{line_no}", pair, order=(self.first_source + idx, line_no))
        except Exception as exc:  # corrupt gzip/zstd streams: never stop the run
            if idx % world_size == rank:
                self.stat_update("in")
                self._quarantine(qout, "unreadable_file", spec.path, line_no + 1, repr(exc)[:500], b"")

    def _parse_pair(self, line: bytes, spec: BitextInput) -> Parsed:
        text, reason, detail = decode_line(line)
        if text is None:
            return None, reason, detail
        if spec.format == TSV:
            fields = text.rstrip("\r\n").split("\t")
            if len(fields) != 2:
                return None, "wrong_columns", f"{len(fields)} tab-separated fields, expected 2 (src, tgt)"
            assert spec.src_lang and spec.tgt_lang  # TSV inputs are resolved before the run
            return self._checked(spec.src_lang, spec.tgt_lang, fields[0], fields[1], ("src", "tgt"))
        record, reason, detail = parse_json_object(text)
        if record is None:
            return None, reason, detail
        src_lang = record.get("src_lang", spec.src_lang)
        tgt_lang = record.get("tgt_lang", spec.tgt_lang)
        if "translation" not in record:
            return self._checked(src_lang, tgt_lang, record.get("src"), record.get("tgt"), ("src", "tgt"))
        tr = record["translation"]
        if not isinstance(tr, dict):
            return None, "not_an_object", f"'translation' is a JSON {type(tr).__name__}"
        if src_lang is None and tgt_lang is None:
            if len(tr) != 2:
                detail = f"'translation' has {len(tr)} languages: name src_lang and tgt_lang"
                return None, "missing_language", detail
            src_lang, tgt_lang = list(tr)
        reason, detail = _language_problem(src_lang, tgt_lang)
        if reason:
            return None, reason, detail
        names = (f"translation.{src_lang}", f"translation.{tgt_lang}")
        return self._checked(src_lang, tgt_lang, tr.get(src_lang), tr.get(tgt_lang), names)

    def _checked(self, src_lang: Any, tgt_lang: Any, src: Any, tgt: Any, names: tuple[str, str]) -> Parsed:
        """The pair, or the reason its languages or sides are unusable."""
        reason, detail = _language_problem(src_lang, tgt_lang)
        if reason:
            return None, reason, detail
        for name, value in zip(names, (src, tgt)):
            if value is None:
                return None, "missing_field", f"no '{name}' value"
            if not isinstance(value, str):
                return None, "non_string_field", f"'{name}' is a {type(value).__name__}"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return None, "invalid_unicode", str(exc)
            if _is_binary(value, self.max_control_frac):
                return None, "binary_content", f"NUL or too many control characters in '{name}'"
        return (src_lang, tgt_lang, src, tgt), "", ""


def _language_problem(src_lang: Any, tgt_lang: Any) -> tuple[str, str]:
    """``(reason, detail)`` when a language is absent or not a code, else ``("", "")``."""
    for key, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if lang is None:
            return "missing_language", f"no '{key}' in the line or the input spec"
        if not isinstance(lang, str) or not LANG_CODE.match(lang):
            return "bad_language", f"'{key}' is {lang!r}, not a language code"
    return "", ""


class GettextPairReader(PipelineStep):
    """Pairs from the gettext catalogs' multi-way table (:func:`multiway_table`): for each English
    message, one pair per two languages that both have it (``en-de``, ``en-fr``, ``de-fr``, in the
    order of ``langs``), so non-English pairs exist although no catalog pairs them directly.

    Every task builds the table; task ``rank`` takes the messages whose index (in English text
    order) is ``rank`` modulo ``world_size``. Counts ``messages``, ``in``/``kept`` (pairs).

    Args:
        langs: languages (``/usr/share/locale`` directory names), ``en`` among them.
        locale_root: root of the ``<lang>/LC_MESSAGES/*.mo`` catalogs.
    """

    name = "📖 gettext pairs"
    type = "📖 - READER"

    def __init__(self, langs: list[str], locale_root: str | Path) -> None:
        super().__init__()
        self.langs = list(langs)
        self.locale_root = Path(locale_root)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield this task's pairs."""
        if data:
            yield from data
        table = multiway_table(self.langs, normalize=normalize, root=self.locale_root)
        for idx, (english, row) in enumerate(table.items()):
            if idx % world_size != rank:
                continue
            self.stat_update("messages")
            for i, a in enumerate(self.langs):
                for b in self.langs[i + 1 :]:
                    if a in row and b in row:
                        self.stat_update("in", "kept")
                        pair = (a, b, row[a], row[b])
                        doc_id = f"gettext:{idx}:{a}-{b}"
                        yield pair_document(doc_id, pair, order=(0, idx), pivot=english, normalized=True)
