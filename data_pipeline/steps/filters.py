"""Document filters. Each returns ``(False, reason)`` so datatrove counts ``dropped_<reason>``.

datatrove's :class:`BaseFilter` counts ``total``/``forwarded``/``dropped`` for every filter; the
statistics of :func:`data_pipeline.clean.run_clean` read those as ``in``/``kept``/``dropped``.
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

_NON_PRINTABLE = frozenset(
    [chr(c) for c in range(0x20) if chr(c) not in "\t\n\r\f"]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\ufffd"]
)


def non_printable_fraction(text: str) -> float:
    """Fraction of ``text`` that is control characters (not tab/newline/form feed) or U+FFFD."""
    if not text:
        return 0.0
    return sum(1 for c in text if c in _NON_PRINTABLE) / len(text)


class NonPrintableFilter(BaseFilter):
    """Drop documents with more than ``max_frac`` non-printable characters (``non_printable``).

    Runs before the control-character remover, so it sees the garbling that the remover would hide.

    Args:
        max_frac: the largest fraction of non-printable characters kept.
    """

    name = "👾 non-printable filter"

    def __init__(self, max_frac: float = 0.05, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__(exclusion_writer)
        self.max_frac = max_frac

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents that are mostly printable."""
        return non_printable_fraction(doc.text) <= self.max_frac or (False, "non_printable")


class LengthFilter(BaseFilter):
    """Drop documents shorter than ``min_chars`` (``too_short``) or longer than ``max_chars``
    (``too_long``), counted in characters after cleaning.

    Args:
        min_chars: the shortest document kept.
        max_chars: the longest document kept.
    """

    name = "📏 length filter"

    def __init__(
        self, min_chars: int = 1, max_chars: int = 1_000_000, exclusion_writer: DiskWriter | None = None
    ) -> None:
        super().__init__(exclusion_writer)
        self.min_chars = min_chars
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents within the length bounds."""
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


class LongLineFilter(BaseFilter):
    """Drop documents with any line longer than ``max_line_chars`` (``long_line``): minified code,
    base64 blobs, tables flattened onto one line.

    Args:
        max_line_chars: the longest line a kept document may have.
    """

    name = "📐 long line filter"

    def __init__(self, max_line_chars: int = 10_000, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__(exclusion_writer)
        self.max_line_chars = max_line_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep documents whose lines are all short enough."""
        if len(doc.text) <= self.max_line_chars:
            return True
        return max(map(len, doc.text.split("\n"))) <= self.max_line_chars or (False, "long_line")
