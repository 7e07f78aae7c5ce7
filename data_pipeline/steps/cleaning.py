"""Rule-based cleaning formatters, each a named datatrove step with its own counters.

Each formatter counts ``in``/``kept`` (formatters never drop), ``modified`` and, when it leaves
code alone (``skip_code=True``), ``skipped_code``. Code is recognised once by :class:`CodeTagger`
(``metadata["_dp_is_code"]``) so that source files keep their string literals and indentation.
Whitespace handling never touches leading indentation, so code blocks, Markdown and LaTeX keep
their structure.
"""

from __future__ import annotations

import html
import re
import unicodedata

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters.base import BaseFormatter

#: Metadata key set by :class:`CodeTagger` (internal: not written to the final output).
IS_CODE_KEY = "_dp_is_code"

_CODE_LINE = re.compile(
    r"^(\s{2,}\S|\t|>>> |\.\.\. |(def|class|import|from|return|if|elif|else|for|while|try|except|with|async|"
    r"await|raise|yield|pass|const|let|var|function|public|private|static|void|int|#include)\b|[#@}]|//|/\*)"
    r"|[:{;)\]]\s*$"
)


def looks_like_code(text: str, min_frac: float = 0.4) -> bool:
    """True when at least ``min_frac`` of the non-blank lines look like code (indented, a keyword
    first, or ending in ``: { ; ) ]``); needs 3+ non-blank lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        return False
    return sum(1 for ln in lines if _CODE_LINE.search(ln)) >= min_frac * len(lines)


class CodeTagger(PipelineStep):
    """Set ``metadata["_dp_is_code"]`` with :func:`looks_like_code`; counts ``code``/``prose``."""

    name = "🏷 code tagger"
    type = "✂️ - FORMAT"

    def __init__(self, min_code_line_frac: float = 0.4) -> None:
        super().__init__()
        self.min_code_line_frac = min_code_line_frac

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Tag and forward every document."""
        for doc in data:
            self.stat_update("in", "kept")
            with self.track_time():
                is_code = looks_like_code(doc.text, self.min_code_line_frac)
            doc.metadata[IS_CODE_KEY] = is_code
            self.stat_update("code" if is_code else "prose")
            yield doc


class CountingFormatter(BaseFormatter):
    """A formatter that counts ``in``/``kept``/``modified`` and can leave code documents alone.

    Args:
        skip_code: leave documents tagged as code unchanged (counted as ``skipped_code``).
    """

    def __init__(self, skip_code: bool = False) -> None:
        super().__init__()
        self.skip_code = skip_code

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Format and forward every document."""
        for doc in data:
            self.stat_update("in", "kept")
            if self.skip_code and doc.metadata.get(IS_CODE_KEY, False):
                self.stat_update("skipped_code")
                yield doc
                continue
            with self.track_time():
                new = self.format(doc.text)
            if new != doc.text:
                self.stat_update("modified")
                doc.text = new
            yield doc


_HTML_TAGS = (
    "a|abbr|address|article|aside|b|big|blockquote|body|br|button|caption|center|cite|code|col|colgroup|dd|del|"
    "details|dfn|div|dl|dt|em|fieldset|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|"
    "input|ins|kbd|label|legend|li|link|main|mark|meta|nav|noscript|ol|optgroup|option|p|pre|q|s|samp|section|select|"
    "small|span|strike|strong|sub|summary|sup|table|tbody|td|textarea|tfoot|th|thead|time|title|tr|tt|u|ul|var|wbr"
)
_BLOCK_TAGS = re.compile(
    r"^(address|article|aside|blockquote|body|br|dd|div|dl|dt|figure|footer|form|h[1-6]|header|"
    r"hr|html|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|tr|ul)$",
    re.I,
)
_HTML_DROP_BLOCKS = re.compile(
    r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<!DOCTYPE[^>]*>", re.I | re.S
)
_HTML_TAG = re.compile(rf"</?({_HTML_TAGS})(\s[^<>]*)?/?>", re.I)


class HtmlStripFormatter(CountingFormatter):
    """Remove HTML tags of known elements, comments, and ``script``/``style`` blocks with their
    content; block elements become a newline. Entities are unescaped only in documents that had
    tags. Only documents that look like HTML (a closing tag of a known element, or at least
    ``min_tags`` tags) are touched, so prose that mentions ``"<P>"`` stays as written; text such
    as ``<module>`` or ``a < b > c`` is not a known tag and always stays.

    Args:
        min_tags: tags needed, without any closing tag, for a document to count as HTML.
        skip_code: leave code documents alone (HTML in their string literals is data).
    """

    name = "🧹 strip html"

    def __init__(self, min_tags: int = 3, skip_code: bool = True) -> None:
        super().__init__(skip_code=skip_code)
        self.min_tags = min_tags

    def format(self, text: str) -> str:
        """Strip HTML from ``text``."""
        if "<" not in text:
            return text
        tags = [m.group(0) for m in _HTML_TAG.finditer(text)]
        if not any(t.startswith("</") for t in tags) and len(tags) < self.min_tags:
            return text
        stripped = _HTML_DROP_BLOCKS.sub("", text)
        stripped = _HTML_TAG.sub(lambda m: "\n" if _BLOCK_TAGS.match(m.group(1)) else "", stripped)
        if stripped == text:
            return text
        return html.unescape(stripped)


_URL = r"(?:(?:https?|ftp)://|www\.)[^\s<>\"'`\\]+[^\s<>\"'`\\.,;:!?)\]]"
_MD_LINK = re.compile(rf"\[([^\]\n]*)\]\(\s*{_URL}\s*\)")
_ANGLE_URL = re.compile(rf"[ \t]?<{_URL}>")
_BARE_URL = re.compile(rf"[ \t]?\(?{_URL}\)?", re.I)


class UrlStripFormatter(CountingFormatter):
    """Remove URLs: a Markdown link keeps its text, ``<url>`` and bare URLs (with one preceding
    space, and enclosing parentheses) disappear. Trailing sentence punctuation is kept.

    Args:
        skip_code: leave code documents alone (a URL in a string literal is data).
    """

    name = "🔗 strip urls"

    def __init__(self, skip_code: bool = True) -> None:
        super().__init__(skip_code=skip_code)

    def format(self, text: str) -> str:
        """Strip URLs from ``text``."""
        if "://" not in text and "www." not in text:
            return text
        text = _MD_LINK.sub(r"\1", text)
        text = _ANGLE_URL.sub("", text)
        return _BARE_URL.sub("", text)


# C0/C1 controls except \t \n \r, lone surrogates are refused by the reader; also the replacement
# character (garbled decoding), BOM / zero-width space, bidi overrides and noncharacters.
_REMOVED_CHARS = (
    [c for c in range(0x20) if chr(c) not in "\t\n\r"]
    + list(range(0x7F, 0xA0))
    + [0xFFFD, 0xFEFF, 0x200B, 0xFFFE, 0xFFFF]
    + list(range(0x202A, 0x202F))
    + list(range(0x2066, 0x206A))
)
_CONTROL_TABLE = dict.fromkeys(_REMOVED_CHARS)


class ControlCharFormatter(CountingFormatter):
    """Remove control characters (keeping tab and newlines), U+FFFD replacement characters,
    zero-width spaces, BOMs, bidi overrides and noncharacters."""

    name = "🧽 remove control chars"

    def format(self, text: str) -> str:
        """Remove the characters listed above."""
        return text.translate(_CONTROL_TABLE)


class PunctuationCollapseFormatter(CountingFormatter):
    """Collapse runs of ``min_run`` or more repeated ``! ? , ;`` to one character (a mixed
    ``!?`` run to ``?!``) and of dots to ``...``. ``:``, ``-``, ``=``, ``*``, ``#`` and ``_``
    are never touched: they carry Markdown/reST structure (rules, headings, tables).

    Args:
        min_run: shortest run that is collapsed (``...`` survives with the default 4).
        skip_code: leave code documents alone (their string literals are data).
    """

    name = "❗ collapse punctuation"

    def __init__(self, min_run: int = 4, skip_code: bool = True) -> None:
        super().__init__(skip_code=skip_code)
        self.min_run = min_run
        self._bang = re.compile(rf"[!?]{{{min_run},}}")
        self._same = re.compile(rf"([,;])\1{{{min_run - 1},}}")
        self._dots = re.compile(rf"\.{{{min_run},}}")

    def format(self, text: str) -> str:
        """Collapse punctuation runs in ``text``."""
        text = self._bang.sub(lambda m: m.group(0)[0] if len(set(m.group(0))) == 1 else "?!", text)
        text = self._same.sub(r"\1", text)
        return self._dots.sub("...", text)


_ODD_SPACES = dict.fromkeys([0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F], " ")
_TRAILING_WS = re.compile(r"[ \t]+$", re.M)


class WhitespaceFormatter(CountingFormatter):
    """Normalise line ends to ``\\n``, odd Unicode spaces to a space, drop trailing whitespace on
    each line and blank lines at both ends, and cap blank-line runs at ``max_blank_lines``.
    Leading indentation and single newlines are never changed.

    Args:
        max_blank_lines: longest run of blank lines kept.
    """

    name = "␣ normalise whitespace"

    def __init__(self, max_blank_lines: int = 2) -> None:
        super().__init__(skip_code=False)
        self.max_blank_lines = max_blank_lines
        self._blank_run = re.compile(rf"\n{{{max_blank_lines + 2},}}")

    def format(self, text: str) -> str:
        """Normalise whitespace in ``text``."""
        text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_ODD_SPACES)
        text = _TRAILING_WS.sub("", text)
        text = self._blank_run.sub("\n" * (self.max_blank_lines + 1), text)
        return text.strip("\n")


class MojibakeFormatter(CountingFormatter):
    """Repair mojibake (UTF-8 decoded as Latin-1/cp1252, e.g. ``"cafÃ©"`` -> ``"café"``) with
    ``ftfy.fix_encoding``. Pure-ASCII documents are skipped without calling ftfy. Only the
    encoding fix runs: quotes, HTML entities, line breaks and character widths are left alone.

    Args:
        skip_code: leave code documents alone.
    """

    name = "🔤 fix mojibake"
    _requires_dependencies = ("ftfy",)

    def __init__(self, skip_code: bool = False) -> None:
        super().__init__(skip_code=skip_code)

    def format(self, text: str) -> str:
        """Repair the encoding of ``text``."""
        if text.isascii():
            return text
        import ftfy

        return ftfy.fix_encoding(text)


# A base64/hex blob: one 64+ character token of the base64 alphabet with letters and digits mixed.
_B64_BLOB = re.compile(
    r"(?<![\w/+=])(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[A-Za-z])[A-Za-z0-9+/]{64,}={0,2}(?![\w/+=])"
)


class GarbledStringFormatter(CountingFormatter):
    """Remove abnormal strings from prose: base64/hex blobs (a 64+ character token of the base64
    alphabet mixing letters and digits) and runs of ``min_symbol_run`` or more non-word,
    non-space symbols (``"#$%^&*@~"``-style garbage). A line made of one repeated character
    (a Markdown rule or heading underline such as ``-----`` or ``=====``) and Markdown table rows
    are kept. Counts ``blobs_removed`` and ``symbol_runs_removed``.

    Args:
        min_symbol_run: shortest symbol run that is removed.
        skip_code: leave code documents alone.
    """

    name = "🗑 remove garbled strings"

    def __init__(self, min_symbol_run: int = 12, skip_code: bool = True) -> None:
        super().__init__(skip_code=skip_code)
        self.min_symbol_run = min_symbol_run
        self._symbols = re.compile(rf"[^\w\s]{{{min_symbol_run},}}")

    def _symbol_run(self, m: re.Match[str]) -> str:
        run = m.group(0)
        if len(set(run)) == 1 and run[0] in "-=*_#~`.|+":  # rules, underlines, fences
            return run
        if set(run) <= set("|-:+ "):  # Markdown table separators
            return run
        self.stat_update("symbol_runs_removed")
        return ""

    def format(self, text: str) -> str:
        """Remove blobs and symbol runs from ``text``."""
        n = len(_B64_BLOB.findall(text)) if len(text) >= 64 else 0
        if n:
            self.stat_update("blobs_removed", value=n)
            text = _B64_BLOB.sub("", text)
        return self._symbols.sub(self._symbol_run, text)


_UNICODE_DIGITS = {
    c: str(unicodedata.digit(chr(c)))
    for c in range(0x660, 0x1FBFA)
    if unicodedata.category(chr(c)) == "Nd" and not chr(c).isascii()
}
_THOUSANDS = re.compile(r"(?<=\d)[,\u00a0\u202f\u2009 ](?=\d{3}(?!\d))")


class NumberFormatter(CountingFormatter):
    """Normalise numbers (off by default in :class:`data_pipeline.clean.CleanConfig`): every
    Unicode decimal digit (full-width, Arabic-Indic, Devanagari ...) becomes its ASCII digit, and
    optionally thousands separators inside numbers are dropped (``1,234,567`` -> ``1234567``).

    Args:
        strip_thousands: remove ``,``/space/thin-space thousands separators between digits.
        skip_code: leave code documents alone.
    """

    name = "🔢 normalise numbers"

    def __init__(self, strip_thousands: bool = False, skip_code: bool = True) -> None:
        super().__init__(skip_code=skip_code)
        self.strip_thousands = strip_thousands

    def format(self, text: str) -> str:
        """Normalise the numbers of ``text``."""
        if not text.isascii():
            text = text.translate(_UNICODE_DIGITS)
        if self.strip_thousands:
            text = _THOUSANDS.sub("", text)
        return text
