"""Data pipeline benchmark, side by side on the same input (the stdlib corpus):

1. documents/s of the full stage 1-4 cleaning pipeline (:func:`data_pipeline.clean.run_clean` with
   default settings: reading, rule-based cleaning, quality and language filters, exact and MinHash
   deduplication) vs datatrove's own Gopher repetition + Gopher quality + C4 filters alone;
2. tokens/s of :func:`data_pipeline.tokenize.tokenize_to_megatron` (per worker count) vs raw
   ``sentencepiece`` encoding of the same texts in one thread.

Usage: ``.venv/bin/python -m bench.bench_data [--mb 3] [--workers 1 2]``. Prints a table and
writes ``bench/results/data.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _datatrove_baseline(corpus: Path, work: Path, workers: int) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from loguru import logger

    logger.disable("datatrove")
    pipeline = [
        JsonlReader(str(corpus.parent), glob_pattern=corpus.name, doc_progress=False),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
    ]
    start = time.perf_counter()
    LocalPipelineExecutor(pipeline, tasks=workers, workers=workers, logging_dir=str(work / "logs")).run()
    return time.perf_counter() - start


def _full_pipeline(corpus: Path, work: Path, workers: int) -> tuple[float, dict]:
    from data_pipeline.clean import CleanConfig, run_clean

    start = time.perf_counter()
    stats = run_clean([corpus], work, CleanConfig(tasks=workers, workers=workers))
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=3.0, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data.json")
    args = parser.parse_args()

    import sentencepiece as spm

    from data_pipeline.corpus import build_stdlib_corpus
    from data_pipeline.jsonl import iter_jsonl_texts
    from data_pipeline.tokenize import tokenize_to_megatron
    from data_pipeline.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows: list[dict] = []
    try:
        corpus = tmp / "corpus" / "stdlib.jsonl"
        info = build_stdlib_corpus(corpus, max_bytes=int(args.mb * 1e6))
        n_docs = info["documents"]
        for w in args.workers:
            base = _datatrove_baseline(corpus, tmp / f"base{w}", w)
            full, stats = _full_pipeline(corpus, tmp / f"full{w}", w)
            rows.append(
                {
                    "measure": f"cleaning docs/s, {w} worker(s)",
                    "ours": round(n_docs / full, 1),
                    "reference": round(n_docs / base, 1),
                    "reference_name": "datatrove Gopher rep + Gopher quality + C4",
                    "time_ratio": round(full / base, 3),
                    "kept_frac": round(stats["totals"]["kept"] / n_docs, 3),
                }
            )

        model = train_tokenizer([corpus], tmp / "tok" / "tok", vocab_size=8000)
        texts = list(iter_jsonl_texts([corpus]))
        sp = spm.SentencePieceProcessor(model_file=str(model))
        start = time.perf_counter()
        raw_tokens = sum(len(ids) for ids in sp.encode(texts))
        raw_tps = raw_tokens / (time.perf_counter() - start)
        for w in args.workers:
            start = time.perf_counter()
            res = tokenize_to_megatron([corpus], model, tmp / "tokens" / f"w{w}", workers=w)
            tps = res["tokens"] / (time.perf_counter() - start)
            rows.append(
                {
                    "measure": f"tokenize tokens/s, {w} worker(s)",
                    "ours": round(tps),
                    "reference": round(raw_tps),
                    "reference_name": "raw sentencepiece encode, 1 thread",
                    "per_worker_vs_raw": round(tps / w / raw_tps, 3),
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {"corpus": {"documents": n_docs, "bytes": info["bytes"]}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data pipeline, stdlib corpus: {n_docs} docs, {info['bytes'] / 1e6:.1f} MB")
    for col in ("measure", "ours", "reference", "ratio", "note"):
        table.add_column(col)
    for r in rows:
        if "time_ratio" in r:
            ratio, note = (
                f"time x{r['time_ratio']}",
                f"kept {r['kept_frac']:.1%}; ref = {r['reference_name']}",
            )
        else:
            ratio, note = f"{r['per_worker_vs_raw']}x raw per worker", f"ref = {r['reference_name']}"
        table.add_row(r["measure"], str(r["ours"]), str(r["reference"]), ratio, note)
    Console().print(table)


if __name__ == "__main__":
    main()
