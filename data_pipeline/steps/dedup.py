"""Exact deduplication by a hash of whitespace-normalised text.

Correct across tasks when each task sees a disjoint hash shard (see
:class:`data_pipeline.steps.readers.HashShardJsonlReader`): every copy of a text then meets in the
same task, whose filter keeps the first copy it reads and drops the rest.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

#: Metadata key holding the hash (internal: ``_dp_`` keys are not written to the final output).
TEXT_HASH_KEY = "_dp_text_hash"

_WS = re.compile(r"\s+")


def normalize_for_hash(text: str) -> str:
    """NFC-normalise and collapse every whitespace run to one space (case is kept)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def text_hash(text: str) -> str:
    """128-bit BLAKE2b hex digest of :func:`normalize_for_hash` of ``text``."""
    return hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=16).hexdigest()


class ExactDedupFilter(BaseFilter):
    """Drop a document whose normalised-text hash this task has already seen (reason ``duplicate``).

    Keeps one hash (16 bytes of hex) per unique document in memory. Uses
    ``metadata[TEXT_HASH_KEY]`` when an earlier step computed it.
    """

    name = "🫂 exact dedup"

    def __init__(self, exclusion_writer: DiskWriter | None = None) -> None:
        super().__init__(exclusion_writer)
        self._seen: set[str] = set()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        """Keep the first copy of each text."""
        digest = doc.metadata.get(TEXT_HASH_KEY) or text_hash(doc.text)
        if digest in self._seen:
            return False, "duplicate"
        self._seen.add(digest)
        return True
