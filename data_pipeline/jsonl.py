"""Small JSONL helpers shared by the corpus builder, the tokenizer trainer and the tokenizer step.

Files may be plain or gzip-compressed; compression is detected from the file's magic bytes, not its
name. These helpers are for already-cleaned data: a bad record raises (the robust, quarantining
reader for raw data lives in :mod:`data_pipeline.steps.readers`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for binary reading, transparently decompressing gzip.

    Args:
        path: a plain or gzip-compressed file.

    Returns:
        A binary file object.
    """
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rb")
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
