"""Small JSONL helpers shared by the corpus builder, the tokenizer trainer and the tokenizer step.

Files may be plain, gzip- or zstd-compressed; compression is detected from the file's magic bytes,
not its name (zstd needs the optional ``zstandard`` package; without it a clear error names it).
These helpers are for already-cleaned data: a bad record raises (the robust, quarantining reader for
raw data lives in :mod:`data_pipeline.steps.readers`).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class MissingDependencyError(RuntimeError):
    """An input needs an optional package that is not installed."""


def compression_of(path: str | Path) -> str | None:
    """``"gzip"``, ``"zstd"`` or ``None`` (plain), from the file's magic bytes."""
    with open(path, "rb") as probe:
        magic = probe.read(4)
    if magic[:2] == GZIP_MAGIC:
        return "gzip"
    if magic == ZSTD_MAGIC:
        return "zstd"
    return None


def check_readable(path: str | Path) -> None:
    """Raise :class:`MissingDependencyError` when ``path`` is zstd-compressed and ``zstandard`` is
    missing (called before a run starts, so it never fails half-way)."""
    if compression_of(path) == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                f"{path} is zstd-compressed: install the 'zstandard' package to read it"
            ) from None


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for binary reading, transparently decompressing gzip and zstd.

    Args:
        path: a plain, gzip- or zstd-compressed file.

    Returns:
        A binary file object.

    Raises:
        MissingDependencyError: the file is zstd-compressed and ``zstandard`` is not installed.
    """
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        check_readable(path)
        import zstandard

        raw = open(path, "rb")  # closed with the returned reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Turn files and directories into a sorted list of files (directories: every ``*.jsonl*``).

    Args:
        paths: files or directories.

    Returns:
        Files in a deterministic order: the given order, each directory's files sorted.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.jsonl*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def iter_jsonl_records(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Yield every JSON object of every file, in order; blank lines are skipped.

    Args:
        paths: JSONL files (plain or gzip) or directories of them.

    Raises:
        ValueError: a line is not a JSON object (names the file and line).
    """
    for path in expand_inputs(paths):
        with open_binary(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield record


def iter_jsonl_texts(paths: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Yield the ``text_key`` string of every record (records without a string there are skipped).

    Args:
        paths: JSONL files (plain or gzip) or directories of them.
        text_key: the field that holds the document text.
    """
    for record in iter_jsonl_records(paths):
        text = record.get(text_key)
        if isinstance(text, str):
            yield text
