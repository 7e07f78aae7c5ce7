"""JSONL writer: one file per task, written under a temporary name and renamed when the task's
stream ends, so a crashed task never leaves a file that looks finished.

(datatrove's own ``JsonlWriter`` needs ``orjson``, which the platform does not depend on.)
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

#: Metadata keys with this prefix are pipeline-internal.
INTERNAL_PREFIX = "_dp_"


def flat_record(document: Document, *, keep_internal: bool = False) -> dict[str, Any]:
    """``{"id", "text", **metadata}``; internal (``_dp_``) keys only when ``keep_internal``."""
    record: dict[str, Any] = {"id": document.id, "text": document.text}
    for key, value in document.metadata.items():
        if keep_internal or not key.startswith(INTERNAL_PREFIX):
            record[key] = value
    return record


class JsonlDocWriter(PipelineStep):
    """Write documents as flat JSON lines to ``folder/<rank>.jsonl`` (``.jsonl.gz`` if ``compress``).

    Counts ``in``/``kept`` (every document is written) and forwards nothing.

    Args:
        folder: output directory (created).
        compress: gzip the output.
        keep_internal: keep ``_dp_`` metadata keys (for intermediate files).
    """

    name = "💾 jsonl writer"
    type = "💽 - WRITER"

    def __init__(self, folder: str | Path, *, compress: bool = False, keep_internal: bool = False) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.compress = compress
        self.keep_internal = keep_internal

    def _open(self, path: Path) -> IO[bytes]:
        opener: Callable[..., IO[bytes]] = gzip.open if self.compress else open
        return opener(path, "wb")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        """Write every document of ``data``; the file appears under its final name at the end."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{rank:05d}.jsonl{'.gz' if self.compress else ''}"
        tmp = final.with_name(final.name + ".tmp")
        with self._open(tmp) as f:
            for doc in data or ():
                self.stat_update("in", "kept")
                with self.track_time():
                    record = flat_record(doc, keep_internal=self.keep_internal)
                    f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        os.replace(tmp, final)
        return
        yield  # a generator, as datatrove expects of a step
