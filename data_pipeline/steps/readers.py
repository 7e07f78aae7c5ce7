"""Readers: a multi-format reader that never fails on bad records (JSONL, Parquet, text files),
and the hash-sharded reader of the deduplication stage.

Every step here counts ``in``/``kept``/``dropped``/``quarantined`` so that
:func:`data_pipeline.clean.run_clean` can check ``in == kept + dropped + quarantined``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_pipeline.jsonl import open_binary
from data_pipeline.steps.dedup import TEXT_HASH_KEY, text_hash

#: How many bytes of a bad record are kept (as text or base64) in its quarantine entry.
PREVIEW_BYTES = 512

#: Input formats: how :func:`file_format` classifies a file.
JSONL, PARQUET, TEXT = "jsonl", "parquet", "text"

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSED_SUFFIXES = ("", ".gz", ".zst", ".zstd")


def file_format(path: str | Path) -> str:
    """``"parquet"`` for ``*.parquet``, ``"jsonl"`` for ``*.jsonl``/``*.ndjson``/``*.json`` (optionally
    ``.gz``/``.zst``), else ``"text"`` (one document per file)."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return PARQUET
    if any(name.endswith(s + c) for s in _JSONL_SUFFIXES for c in _COMPRESSED_SUFFIXES):
        return JSONL
    return TEXT


def _is_binary(text: str, max_control_frac: float) -> bool:
    """True for text with a NUL, or with more than ``max_control_frac`` C0 control characters."""
    if "\x00" in text:
        return True
    controls = sum(1 for c in text if c < " " and c not in "\t\n\r\f")
    return controls > max_control_frac * max(len(text), 1)


def decode_line(line: bytes) -> tuple[str | None, str, str]:
    """``(text, "", "")`` for a UTF-8 line without NUL bytes, else ``(None, reason, detail)`` with
    reason ``binary_content`` or ``invalid_utf8`` (shared by every line-based reader)."""
    if b"\x00" in line:
        return None, "binary_content", "NUL byte in the raw line"
    try:
        return line.decode("utf-8"), "", ""
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", str(exc)


def parse_json_object(text: str) -> tuple[dict[str, Any] | None, str, str]:
    """``(record, "", "")`` for a line holding one JSON object, else ``(None, reason, detail)``
    with reason ``invalid_json`` or ``not_an_object`` (shared by the JSONL readers)."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, "invalid_json", f"{type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(record, dict):
        return None, "not_an_object", f"a JSON {type(record).__name__}"
    return record, "", ""


class QuarantiningReader(PipelineStep):
    """Read JSONL (plain, gzip or zstd), Parquet and plain-text files; quarantine, never raise on,
    bad records.

    A bad record is written to ``quarantine_dir/<rank>.jsonl`` (reason, file, line or row, detail,
    a preview of the raw bytes) and counted as ``quarantined`` + ``quarantined_<reason>``:

    - JSONL lines: longer than ``max_record_bytes`` (``line_too_long``), not UTF-8
      (``invalid_utf8``), not JSON or nested too deeply (``invalid_json``), not an object
      (``not_an_object``), no string ``text_key`` (``missing_text`` / ``non_string_text``), lone
      surrogates (``invalid_unicode``), binary (``binary_content``). Blank lines are ``dropped``
      (``blank_line``).
    - Parquet rows: null or non-string text (``missing_text`` / ``non_string_text``), binary; a
      file without the text column quarantines one ``missing_text_column`` entry.
    - Text files (one document per file, id = the path): larger than ``max_record_bytes``
      (``file_too_large``), not UTF-8, binary.
    - A file that cannot be read to the end (corrupt gzip, broken Parquet) quarantines one
      ``unreadable_file`` entry and the reader moves on.

    Sharding: task ``rank`` of ``world_size`` takes the JSONL lines and Parquet rows whose index
    in their file is ``rank`` modulo ``world_size`` (so any number of tasks splits even one
    file), and every ``world_size``-th text file.

    Args:
        files: input files, read in this order.
        quarantine_dir: where quarantine files are written.
        formats: the format of each file (default: :func:`file_format`).
        text_key: the field (JSONL) or column (Parquet) holding the text.
        id_key: the field or column holding the id (default id: ``<file name>:<line or row>``).
        max_record_bytes: longer lines / larger text files are quarantined without being parsed.
        max_control_frac: fraction of control characters above which text counts as binary.
        text_roots: per file, the directory that text-file ids are relative to (default: the file
            name is the id).
    """

    name = "📖 quarantining reader"
    type = "📖 - READER"

    def __init__(
        self,
        files: list[str | Path],
        quarantine_dir: str | Path,
        *,
        formats: list[str] | None = None,
        text_key: str = "text",
        id_key: str = "id",
        max_record_bytes: int = 16 * 2**20,
        max_control_frac: float = 0.1,
        text_roots: list[str | None] | None = None,
    ) -> None:
        super().__init__()
        self.files = [str(f) for f in files]
        self.formats = formats or [file_format(f) for f in self.files]
        self.text_roots = text_roots or [None] * len(self.files)
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

    def _check_text(self, text: Any) -> tuple[str, str]:
        """``(reason, detail)`` for a bad text value, ``("", "")`` for a good one."""
        if text is None:
            return "missing_text", f"no '{self.text_key}' value"
        if not isinstance(text, str):
            return "non_string_text", f"'{self.text_key}' is a {type(text).__name__}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return "invalid_unicode", str(exc)
        if _is_binary(text, self.max_control_frac):
            return "binary_content", "NUL or too many control characters in the text"
        return "", ""

    def _parse(self, line: bytes) -> tuple[dict[str, Any] | None, str, str]:
        """``(record, reason, detail)``: ``record`` is None when the line must be quarantined."""
        decoded, reason, detail = decode_line(line)
        if decoded is None:
            return None, reason, detail
        record, reason, detail = parse_json_object(decoded)
        if record is None:
            return None, reason, detail
        reason, detail = self._check_text(record.get(self.text_key))
        if reason:
            return None, reason, detail
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
        text_idx = 0
        with open(self.quarantine_dir / f"{rank:05d}.jsonl", "w", encoding="utf-8") as qout:
            for file_idx, (file, fmt) in enumerate(zip(self.files, self.formats)):
                if fmt == PARQUET:
                    yield from self._read_parquet(file, file_idx, qout, rank, world_size)
                elif fmt == TEXT:
                    if text_idx % world_size == rank:
                        yield from self._read_text_file(file, self.text_roots[file_idx], qout)
                    text_idx += 1
                else:
                    yield from self._read_jsonl(file, file_idx, qout, rank, world_size)

    def _read_jsonl(
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
        except Exception as exc:
            # corrupt gzip/zstd streams and other decoder failures: never stop the run
            if file_idx % world_size == rank:
                self.stat_update("in")
                self._quarantine(qout, "unreadable_file", file, line_no + 1, repr(exc), b"")

    def _read_parquet(
        self, file: str, file_idx: int, qout: IO[str], rank: int, world_size: int
    ) -> DocumentsPipeline:
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            if self.text_key not in names:
                if file_idx % world_size == rank:
                    self.stat_update("in")
                    detail = f"no column '{self.text_key}' (columns: {names[:20]})"
                    self._quarantine(qout, "missing_text_column", file, 0, detail, b"")
                return
            for batch in pf.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    if (row - 1) % world_size != rank:
                        continue
                    self.stat_update("in")
                    reason, detail = self._check_text(record.get(self.text_key))
                    if reason:
                        raw = repr(record.get(self.text_key))[:PREVIEW_BYTES].encode("utf-8", "replace")
                        self._quarantine(qout, reason, file, row, detail, raw)
                        continue
                    self.stat_update("kept")
                    record = {k: _jsonable(v) for k, v in record.items()}
                    yield self._to_document(record, file, row)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            if file_idx % world_size == rank:
                self.stat_update("in")
                self._quarantine(qout, "unreadable_file", file, row + 1, repr(exc)[:500], b"")

    def _read_text_file(self, file: str, root: str | None, qout: IO[str]) -> DocumentsPipeline:
        self.stat_update("in")
        doc_id = Path(file).relative_to(root).as_posix() if root else Path(file).name
        try:
            with open_binary(file) as f:
                raw = f.read(self.max_record_bytes + 1)
        except Exception as exc:
            self._quarantine(qout, "unreadable_file", file, 0, repr(exc)[:500], b"")
            return
        if len(raw) > self.max_record_bytes:
            self._quarantine(
                qout, "file_too_large", file, 0, f"larger than {self.max_record_bytes} bytes", raw
            )
            return
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self._quarantine(qout, "invalid_utf8", file, 0, str(exc), raw)
            return
        reason, detail = self._check_text(text)
        if reason:
            self._quarantine(qout, reason, file, 0, detail, raw)
            return
        if not text.strip():
            self.stat_update("dropped", "dropped_blank_line")
            return
        self.stat_update("kept")
        yield Document(text=text, id=doc_id, metadata={"source_file": doc_id})

    def _to_document(self, record: dict[str, Any], file: str, line_no: int) -> Document:
        text = record.pop(self.text_key)
        doc_id = record.pop(self.id_key, None)
        if doc_id is None:
            doc_id = f"{Path(file).name}:{line_no}"
        return Document(text=text, id=str(doc_id), metadata=record)


#: Kept for callers of the earlier name (JSONL only was its scope; it reads every format now).
QuarantiningJsonlReader = QuarantiningReader


def _jsonable(value: Any) -> Any:
    """Parquet values (dates, bytes, decimals) as JSON-able values."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


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


class RankFileJsonlReader(PipelineStep):
    """Read ``folder/<rank>.jsonl[.gz]``, the file that task ``rank`` of the previous stage wrote
    (same number of tasks), in order: the MinHash signature and filter stages must see the same
    documents in the same order. Counts ``in``/``kept``.

    Args:
        folder: the previous stage's output directory.
    """

    name = "📖 per-task jsonl reader"
    type = "📖 - READER"

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Yield the documents of this task's file (none if the file does not exist)."""
        if data:
            yield from data
        for file in sorted(self.folder.glob(f"{rank:05d}.jsonl*")):
            if file.name.endswith(".tmp"):
                continue
            with open_binary(file) as f:
                for line in f:
                    record = json.loads(line)
                    self.stat_update("in", "kept")
                    text, doc_id = record.pop("text"), record.pop("id")
                    yield Document(text=text, id=doc_id, metadata=record)
