"""Tokenise cleaned JSONL into Megatron's indexed format (``<prefix>.bin`` + ``<prefix>.idx``).

This on-disk format is the only contract with the training data loaders: one record per
document (boundaries kept), the end-of-document id appended to each, token dtype ``uint16`` when
the vocabulary fits (``int32`` otherwise, megatron's ``DType.optimal_dtype``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from data_pipeline.jsonl import iter_jsonl_texts
from data_pipeline.tokenizer import SentencePieceTokenizer

#: Documents encoded per batch (the unit of parallel encoding).
BATCH_DOCS = 512


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, size)):
        yield batch


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
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx")
    tmp_bin, tmp_idx = (p.with_name(f"{p.name}.tmp{os.getpid()}") for p in (bin_path, idx_path))
    idx_path.unlink(missing_ok=True)

    start = time.perf_counter()
    n_docs = n_tokens = n_empty = 0
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        for batch in _batches(iter_jsonl_texts(inputs, text_key=text_key), BATCH_DOCS):
            texts = [t for t in batch if t]
            n_empty += len(batch) - len(texts)
            encoded = tokenizer.encode_batch(texts, num_threads=workers)
            for ids in encoded:
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
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
