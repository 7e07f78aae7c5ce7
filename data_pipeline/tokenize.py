"""Tokenise cleaned JSONL into Megatron's indexed format (``<prefix>.bin`` + ``<prefix>.idx``).

This on-disk format is the only contract with the training data loaders: one record per
document (boundaries kept), the end-of-document id appended to each, token dtype ``uint16`` when
the vocabulary fits (``int32`` otherwise, megatron's ``DType.optimal_dtype``).

Two entry points: :func:`tokenize_to_megatron` encodes in this process (SentencePiece threads);
:func:`tokenize_parallel` splits the documents into ``tasks`` *contiguous* ranges (document
``i`` of the whole input in input order goes to the task whose range holds ``i``), runs one
datatrove task per range (:class:`MegatronTokenizeStep`, resumable: finished tasks are skipped)
writing ``<prefix>_shards/<rank>.bin/.idx``, then by default merges the shards in rank order into
one ``<prefix>.bin/.idx`` with megatron's ``IndexedDatasetBuilder.add_index``. Contiguous ranges
plus a rank-ordered merge make the result identical, token for token, to the sequential one for
any number of tasks. With ``merge=False`` the shards stay as N prefixes (list them in a blend).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from pydantic import Field

from data_pipeline.jsonl import expand_inputs, iter_jsonl_texts, open_binary
from data_pipeline.tokenizer import SentencePieceTokenizer
from pretrain.config import Config

#: Documents encoded per batch (the unit of parallel encoding).
BATCH_DOCS = 512

#: Runs a datatrove pipeline as ``tasks`` tasks logged under ``logging_dir`` and returns when done.
PipelineRunner = Callable[[list[PipelineStep], Path, int], None]


class TokenizeConfig(Config):
    """Settings of :func:`tokenize_parallel` (the ``tokenize`` section of a data run)."""

    append_eod: bool = True
    """Append the end-of-document id to every document (megatron's document boundary)."""
    merge: bool = True
    """Merge the per-task shards into one ``.bin/.idx`` (else keep N prefixes)."""
    threads: int = Field(1, ge=1)
    """SentencePiece encoding threads inside each task."""
    output_name: str = "corpus"
    """File name of the output prefix inside the run's ``tokens/`` directory."""


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    texts = iter(texts)
    while batch := list(itertools.islice(texts, size)):
        yield batch


def _paths(prefix: Path) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def write_megatron(
    texts: Iterable[str],
    tokenizer: SentencePieceTokenizer,
    output_prefix: Path,
    *,
    append_eod: bool = True,
    threads: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode ``texts`` into ``output_prefix.bin/.idx``, crash-safely (see :func:`tokenize_to_megatron`).

    Args:
        texts: documents in order (empty ones are skipped and counted).
        tokenizer: the SentencePiece tokenizer.
        output_prefix: path prefix of the two output files (parent directories are created).
        append_eod: append the end-of-document id to every document.
        threads: SentencePiece encoding threads (output order is unchanged).
        on_batch: called with ``(documents, tokens)`` of every encoded batch.

    Returns:
        ``{"documents", "tokens", "skipped_empty", "seconds", "dtype"}``.
    """
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = _paths(output_prefix)
    tmp_bin, tmp_idx = (p.with_name(f"{p.name}.tmp{os.getpid()}") for p in (bin_path, idx_path))
    idx_path.unlink(missing_ok=True)

    start = time.perf_counter()
    n_docs = n_tokens = n_empty = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        for batch in _batches(texts, BATCH_DOCS):
            kept = [t for t in batch if t]
            n_empty += len(batch) - len(kept)
            batch_tokens = 0
            for ids in tokenizer.encode_batch(kept, num_threads=threads):
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                batch_tokens += len(ids)
            n_docs += len(kept)
            n_tokens += batch_tokens
            if on_batch:
                on_batch(len(kept), batch_tokens)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return {
        "documents": n_docs,
        "tokens": n_tokens,
        "skipped_empty": n_empty,
        "seconds": round(time.perf_counter() - start, 3),
        "dtype": np.dtype(dtype).name,
    }


def tokenize_to_megatron(
    inputs: list[Path],
    tokenizer_path: Path,
    output_prefix: Path,
    *,
    append_eod: bool = True,
    workers: int = 1,
    text_key: str = "text",
) -> dict:
    """Encode every document of ``inputs`` and write ``output_prefix.bin`` / ``output_prefix.idx``.

    Crash safety: any existing ``.idx`` is removed first, both files are written under temporary
    names, then the ``.bin`` and last the ``.idx`` are renamed into place; so an ``.idx`` that
    exists always belongs to a complete ``.bin``. Empty texts are skipped (counted).

    Args:
        inputs: JSONL files (plain or gzip) or directories of them, read in order.
        tokenizer_path: a SentencePiece ``.model``.
        output_prefix: path prefix of the two output files (parent directories are created).
        append_eod: append the end-of-document id to every document.
        workers: encoding threads (SentencePiece's batch encoder; output order is unchanged).
        text_key: the JSONL field with the text.

    Returns:
        ``{"documents", "tokens", "skipped_empty", "seconds", "dtype"}``.
    """
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    texts = iter_jsonl_texts(inputs, text_key=text_key)
    return write_megatron(texts, tokenizer, output_prefix, append_eod=append_eod, threads=workers)


def count_records(files: list[Path]) -> list[int]:
    """Non-blank lines (JSONL records) of each file, without parsing them."""
    counts = []
    for path in files:
        with open_binary(path) as f:
            counts.append(sum(1 for line in f if line.strip()))
    return counts


def task_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[lo, hi)`` slice of ``total`` records that task ``rank`` owns."""
    return total * rank // world_size, total * (rank + 1) // world_size


def _texts_in_range(
    files: list[Path], counts: list[int], lo: int, hi: int, text_key: str
) -> Iterator[str | None]:
    """The ``text_key`` of records ``lo .. hi-1`` (global record order); ``None`` for a record
    without a string there."""
    offset = 0
    for path, n in zip(files, counts):
        if offset + n <= lo or offset >= hi:
            offset += n
            continue
        with open_binary(path) as f:
            index = offset
            for line in f:
                if not line.strip():
                    continue
                if index >= hi:
                    break
                if index >= lo:
                    text = json.loads(line).get(text_key)
                    yield text if isinstance(text, str) else None
                index += 1
        offset += n


class MegatronTokenizeStep(PipelineStep):
    """Tokenise one contiguous range of the input records per task into ``shard_dir/<rank>.bin/.idx``.

    Counts ``documents``, ``tokens`` and ``skipped`` (records without text or with empty text).

    Args:
        files: JSONL inputs, in order.
        counts: records per file (:func:`count_records`).
        tokenizer_path: a SentencePiece ``.model`` (loaded once per task).
        shard_dir: output directory of the shards.
        append_eod: append the end-of-document id.
        threads: SentencePiece encoding threads.
        text_key: the JSONL field with the text.
    """

    name = "🔢 megatron tokenizer"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        files: list[Path],
        counts: list[int],
        tokenizer_path: Path,
        shard_dir: Path,
        *,
        append_eod: bool = True,
        threads: int = 1,
        text_key: str = "text",
    ) -> None:
        super().__init__()
        self.files, self.counts = [Path(f) for f in files], list(counts)
        self.tokenizer_path, self.shard_dir = Path(tokenizer_path), Path(shard_dir)
        self.append_eod, self.threads, self.text_key = append_eod, threads, text_key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        lo, hi = task_range(sum(self.counts), rank, world_size)
        tokenizer = SentencePieceTokenizer(self.tokenizer_path)
        skipped = 0

        def texts() -> Iterator[str]:
            nonlocal skipped
            for text in _texts_in_range(self.files, self.counts, lo, hi, self.text_key):
                if text is None:
                    skipped += 1
                else:
                    yield text

        def count(docs: int, tokens: int) -> None:
            self.stat_update("documents", value=docs)
            self.stat_update("tokens", value=tokens)

        with self.track_time():
            result = write_megatron(
                texts(),
                tokenizer,
                self.shard_dir / f"{rank:05d}",
                append_eod=self.append_eod,
                threads=self.threads,
                on_batch=count,
            )
        self.stat_update("skipped", value=skipped + result["skipped_empty"])
        return
        yield  # a generator, as datatrove expects of a step


def local_runner(workers: int = 1) -> PipelineRunner:
    """A :data:`PipelineRunner` on datatrove's ``LocalPipelineExecutor`` (skips finished tasks)."""

    def run(pipeline: list[PipelineStep], logging_dir: Path, tasks: int) -> None:
        from datatrove.executor import LocalPipelineExecutor

        LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(logging_dir),
            skip_completed=True,
        ).run()

    return run


def tokenize_parallel(
    inputs: list[Path],
    tokenizer_path: Path,
    output_prefix: Path,
    *,
    tasks: int = 1,
    config: TokenizeConfig | None = None,
    runner: PipelineRunner | None = None,
    text_key: str = "text",
) -> dict:
    """Tokenise ``inputs`` in ``tasks`` datatrove tasks (see the module docstring).

    Args:
        inputs: JSONL files (plain or gzip) or directories of them, in order.
        tokenizer_path: a SentencePiece ``.model``.
        output_prefix: the merged output prefix; shards go to ``<prefix>_shards/`` and datatrove's
            logs to ``<prefix>_logs/``.
        tasks: number of tasks (contiguous document ranges).
        config: settings (default :class:`TokenizeConfig()`).
        runner: runs the pipeline (default: local, one worker).
        text_key: the JSONL field with the text.

    Returns:
        ``{"documents", "tokens", "skipped", "prefixes", "dtype", "seconds"}``; ``prefixes`` lists
        the output prefix (merged) or the shard prefixes.
    """
    cfg = config or TokenizeConfig()
    start = time.perf_counter()
    files = expand_inputs(inputs)
    output_prefix = Path(output_prefix)
    shard_dir = Path(f"{output_prefix}_shards")
    logs = Path(f"{output_prefix}_logs")
    step = MegatronTokenizeStep(
        files,
        count_records(files),
        tokenizer_path,
        shard_dir,
        append_eod=cfg.append_eod,
        threads=cfg.threads,
        text_key=text_key,
    )
    (runner or local_runner())([step], logs, tasks)

    skipped = 0
    for path in sorted((logs / "stats").glob("*.json")):
        for entry in json.loads(path.read_text()):
            value = entry.get("stats", {}).get("skipped", 0)
            skipped += int(value.get("total", 0) if isinstance(value, dict) else value)
    shards = [shard_dir / f"{rank:05d}" for rank in range(tasks)]
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    if cfg.merge:
        prefixes = [output_prefix]
        _merge(shards, output_prefix, dtype)
        shutil.rmtree(shard_dir)
        shutil.rmtree(logs / "completions", ignore_errors=True)  # the shards are gone: redo on re-run
    else:
        prefixes = shards
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = tokens = 0
    for prefix in prefixes:
        ds = IndexedDataset(str(prefix))
        docs += len(ds)
        tokens += int(ds.sequence_lengths.sum())
    return {
        "documents": docs,
        "tokens": tokens,
        "skipped": skipped,
        "prefixes": [str(p) for p in prefixes],
        "dtype": np.dtype(dtype).name,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _merge(shards: list[Path], output_prefix: Path, dtype: type) -> None:
    """Concatenate ``shards`` in order into ``output_prefix`` (written under temp names, ``.idx`` last)."""
    bin_path, idx_path = _paths(output_prefix)
    tmp_bin, tmp_idx = (p.with_name(f"{p.name}.tmp{os.getpid()}") for p in (bin_path, idx_path))
    idx_path.unlink(missing_ok=True)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        for shard in shards:
            builder.add_index(str(shard))
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
