"""The loop's other datatrove steps: a JSONL reader for already-cleaned files, and the split of
scored documents into kept and dropped files with a review sample."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from data_pipeline.jsonl import open_binary
from data_pipeline.selfclean.scoring import PPL_KEY, TOKENS_KEY


class CleanJsonlReader(PipelineStep):
    """Read cleaned JSONL (``{"id", "text", ...metadata}``); task ``rank`` takes the non-blank
    lines whose index (over all files, in order) is ``rank`` modulo ``world_size``.

    Args:
        files: JSONL files (plain or gzip), in order.
        text_key: the field holding the text.
        id_key: the field holding the id.
    """

    name = "📖 cleaned jsonl reader"
    type = "📖 - READER"

    def __init__(self, files: list[Path], *, text_key: str = "text", id_key: str = "id") -> None:
        super().__init__()
        self.files, self.text_key, self.id_key = [Path(f) for f in files], text_key, id_key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        index = 0
        for path in self.files:
            with open_binary(path) as f:
                for line in f:
                    if not line.strip():
                        continue
                    index += 1
                    if (index - 1) % world_size != rank:
                        continue
                    record = json.loads(line)
                    text = record.pop(self.text_key, "")
                    doc_id = str(record.pop(self.id_key, f"{path.name}:{index - 1}"))
                    self.stat_update("in")
                    yield Document(text=text if isinstance(text, str) else "", id=doc_id, metadata=record)


def review_record(doc: Document, kept: bool, chars: int) -> dict:
    """What a reviewer sees of a document: id, score, decision and the start of its text."""
    return {
        "id": doc.id,
        "perplexity": doc.metadata.get(PPL_KEY),
        "tokens": doc.metadata.get(TOKENS_KEY),
        "kept": kept,
        "text": doc.text[:chars],
    }


class ThresholdSplitter(PipelineStep):
    """Write documents with ``perplexity <= threshold`` to ``kept_dir/<rank>.jsonl`` and the others
    to ``dropped_dir/<rank>.jsonl``; keep a seeded reservoir of ``review_samples`` of each for
    ``review_dir/<rank>.jsonl``. Counts ``in``, ``kept`` and ``dropped`` (``in == kept + dropped``).

    Files are written under temporary names and renamed at the end of the task.
    """

    name = "✂️ perplexity threshold split"
    type = "🔻 - FILTER"

    def __init__(
        self,
        threshold: float,
        kept_dir: Path,
        dropped_dir: Path,
        review_dir: Path,
        *,
        review_samples: int = 20,
        review_chars: int = 600,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.kept_dir, self.dropped_dir, self.review_dir = Path(kept_dir), Path(dropped_dir), Path(review_dir)
        self.review_samples, self.review_chars, self.seed = review_samples, review_chars, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        rng = random.Random(self.seed * 100_003 + rank)
        reservoirs: dict[bool, list[dict]] = {True: [], False: []}
        seen = {True: 0, False: 0}
        outputs = {}
        for flag, folder in ((True, self.kept_dir), (False, self.dropped_dir), (None, self.review_dir)):
            folder.mkdir(parents=True, exist_ok=True)
            outputs[flag] = folder / f"{rank:05d}.jsonl"
        files = {flag: open(f"{path}.tmp", "w", encoding="utf-8") for flag, path in outputs.items()}
        try:
            for doc in data or ():
                ppl = float(doc.metadata.get(PPL_KEY, math.inf))
                kept = math.isfinite(ppl) and ppl <= self.threshold
                self.stat_update("in")
                self.stat_update("kept" if kept else "dropped")
                record = {"id": doc.id, "text": doc.text, **doc.metadata}
                files[kept].write(json.dumps(record, ensure_ascii=False) + "\n")
                seen[kept] += 1
                sample = reservoirs[kept]
                if len(sample) < self.review_samples:
                    sample.append(review_record(doc, kept, self.review_chars))
                else:
                    j = rng.randrange(seen[kept])
                    if j < self.review_samples:
                        sample[j] = review_record(doc, kept, self.review_chars)
            for record in reservoirs[True] + reservoirs[False]:
                files[None].write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            for f in files.values():
                f.close()
        for path in outputs.values():
            os.replace(f"{path}.tmp", path)
        return
        yield  # a generator, as datatrove expects of a step
