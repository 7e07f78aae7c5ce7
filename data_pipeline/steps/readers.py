"""Readers: a JSONL reader that never fails on bad records, and the hash-sharded reader of the
deduplication stage.

Every step here counts ``in``/``kept``/``dropped``/``quarantined`` so that
:func:`data_pipeline.clean.run_clean` can check ``in == kept + dropped + quarantined``.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_pipeline.jsonl import open_binary
from data_pipeline.steps.dedup import TEXT_HASH_KEY, text_hash

#: How many bytes of a bad record are kept (as text or base64) in its quarantine entry.
PREVIEW_BYTES = 512


def _is_binary(text: str, max_control_frac: float) -> bool:
    """True for text with a NUL, or with more than ``max_control_frac`` C0 control characters."""
    if "\x00" in text:
        return True
    controls = sum(1 for c in text if c < " " and c not in "\t\n\r\f")
    return controls > max_control_frac * max(len(text), 1)


class QuarantiningJsonlReader(PipelineStep):
    """Read JSONL files (plain or gzip) and quarantine, never raise on, bad records.

    A record is quarantined (written to ``quarantine_dir/<rank>.jsonl`` with its reason, file and
    line, and counted as ``quarantined`` + ``quarantined_<reason>``) when its line is longer than
    ``max_record_bytes`` (``line_too_long``), is not UTF-8 (``invalid_utf8``), is not JSON
    (``invalid_json``), is not an object (``not_an_object``), lacks a string ``text_key``
    (``missing_text`` / ``non_string_text``), holds unencodable lone surrogates
    (``invalid_unicode``) or looks binary (``binary_content``). A file that cannot be read to the
    end (corrupt gzip) quarantines one ``unreadable_file`` entry and the reader moves on. Blank
    lines are ``dropped`` (``blank_line``).

    Sharding: task ``rank`` of ``world_size`` takes the lines whose index in their file is
    ``rank`` modulo ``world_size``, so any number of tasks splits even a single file.

    Args:
        files: input files, read in this order.
        quarantine_dir: where quarantine files are written.
        text_key: the field holding the text.
        id_key: the field holding the id (default id: ``<file name>:<line>``).
        max_record_bytes: longer lines are quarantined without being parsed.
        max_control_frac: fraction of control characters above which text counts as binary.
    """

    name = "📖 quarantining jsonl reader"
    type = "📖 - READER"

    def __init__(
        self,
        files: list[str | Path],
        quarantine_dir: str | Path,
        *,
        text_key: str = "text",
        id_key: str = "id",
        max_record_bytes: int = 16 * 2**20,
        max_control_frac: float = 0.1,
    ) -> None:
        super().__init__()
        self.files = [str(f) for f in files]
        self.quarantine_dir = Path(quarantine_dir)
        self.text_key = text_key
        self.id_key = id_key
        self.max_record_bytes = max_record_bytes
        self.max_control_frac = max_control_frac

    def _lines(self, f: IO[bytes]) -> Iterator[tuple[bytes, bool]]:
        """``(line, too_long)``; a too-long line yields its first bytes and the rest is skipped."""
        limit = self.max_record_bytes
        while True:
            line = f.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while True:  # skip the rest of this line in bounded chunks
                    rest = f.readline(1 << 20)
                    if not rest or rest.endswith(b"\n"):
                        break
                yield line[:PREVIEW_BYTES], True
            else:
                yield line, False

    def _parse(self, line: bytes) -> tuple[dict[str, Any] | None, str, str]:
        """``(record, reason, detail)``: ``record`` is None when the line must be quarantined."""
        if b"\x00" in line:
            return None, "binary_content", "NUL byte in the raw line"
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "invalid_utf8", str(exc)
        try:
            record = json.loads(decoded)
        except ValueError as exc:
            return None, "invalid_json", str(exc)
        if not isinstance(record, dict):
            return None, "not_an_object", f"a JSON {type(record).__name__}"
        text = record.get(self.text_key)
        if text is None:
            return None, "missing_text", f"no '{self.text_key}' field"
        if not isinstance(text, str):
            return None, "non_string_text", f"'{self.text_key}' is a {type(text).__name__}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return None, "invalid_unicode", str(exc)
        if _is_binary(text, self.max_control_frac):
            return None, "binary_content", "NUL or too many control characters in the text"
        return record, "", ""

    def _quarantine(
        self, out: IO[str], reason: str, file: str, line_no: int, detail: str, raw: bytes
    ) -> None:
        self.stat_update("quarantined", f"quarantined_{reason}")
        raw = raw[:PREVIEW_BYTES]
        try:
            preview, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            preview, encoding = base64.b64encode(raw).decode("ascii"), "base64"
        entry = {"reason": reason, "file": file, "line": line_no, "detail": detail}
        entry |= {"raw_preview": preview, "raw_encoding": encoding}
        out.write(json.dumps(entry, ensure_ascii=True) + "\n")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield one :class:`Document` per good record of this task's shard."""
        if data:
            yield from data
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        with open(self.quarantine_dir / f"{rank:05d}.jsonl", "w", encoding="utf-8") as qout:
            for file_idx, file in enumerate(self.files):
                yield from self._read_file(file, file_idx, qout, rank, world_size)

    def _read_file(
        self, file: str, file_idx: int, qout: IO[str], rank: int, world_size: int
    ) -> DocumentsPipeline:
        line_no = 0
        try:
            with open_binary(file) as f:
                for line_no, (line, too_long) in enumerate(self._lines(f), 1):
                    if (line_no - 1) % world_size != rank:
                        continue
                    self.stat_update("in")
                    if too_long:
                        detail = f"line longer than {self.max_record_bytes} bytes"
                        self._quarantine(qout, "line_too_long", file, line_no, detail, line)
                        continue
                    if not line.strip():
                        self.stat_update("dropped", "dropped_blank_line")
                        continue
                    with self.track_time():
                        record, reason, detail = self._parse(line)
                    if record is None:
                        self._quarantine(qout, reason, file, line_no, detail, line)
                        continue
                    self.stat_update("kept")
                    yield self._to_document(record, file, line_no)
        except (OSError, EOFError, zlib.error) as exc:
            if file_idx % world_size == rank:
                self.stat_update("in")
                self._quarantine(qout, "unreadable_file", file, line_no + 1, repr(exc), b"")

    def _to_document(self, record: dict[str, Any], file: str, line_no: int) -> Document:
        text = record.pop(self.text_key)
        doc_id = record.pop(self.id_key, None)
        if doc_id is None:
            doc_id = f"{Path(file).name}:{line_no}"
        return Document(text=text, id=str(doc_id), metadata=record)


class HashShardJsonlReader(PipelineStep):
    """Read the JSONL output of the cleaning stage, keeping the documents of this task's hash shard.

    Task ``rank`` keeps the documents whose normalised-text hash is ``rank`` modulo ``world_size``,
    so all copies of a document meet in the same task and exact deduplication is global. Every task
    reads every file (cheap next to cleaning); only its own shard is counted.

    Args:
        folder: the directory of ``*.jsonl``/``*.jsonl.gz`` files, read in sorted order.
    """

    name = "📖 hash-sharded jsonl reader"
    type = "📖 - READER"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield this shard's documents, with ``metadata["text_hash"]`` set."""
        if data:
            yield from data
        for file in sorted(self.folder.glob("*.jsonl*")):
            with open_binary(file) as f:
                for line in f:
                    record = json.loads(line)
                    digest = text_hash(record["text"])
                    if int(digest[:8], 16) % world_size != rank:
                        continue
                    self.stat_update("in", "kept")
                    text, doc_id = record.pop("text"), record.pop("id")
                    record[TEXT_HASH_KEY] = digest
                    yield Document(text=text, id=doc_id, metadata=record)
