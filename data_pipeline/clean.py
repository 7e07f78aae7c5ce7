"""Cleaning pipeline: robust JSONL reading with quarantine, rule-based cleaning, filters, exact
deduplication and a JSONL writer, run by datatrove's :class:`LocalPipelineExecutor`.

Stage order (fixed here): read (quarantine bad records) -> non-printable filter -> code tagger ->
strip HTML -> strip URLs -> remove control characters -> collapse punctuation -> normalise
whitespace -> length filter -> long-line filter -> write. With ``dedup=True`` the cleaned documents
go to an intermediate folder and a second datatrove stage reads them back sharded by text hash,
so exact deduplication is global for any number of tasks (every copy of a text lands in the same
task), then writes the output.

Layout of ``output_dir``: ``output/`` (kept documents, ``{"id", "text", <other input fields>}``),
``quarantine/`` (one JSON line per bad record: reason, file, line, detail, raw preview),
``logs/<stage>/`` (datatrove logs, per-task stats and completion markers), ``stats.json`` and
``clean_config.json`` (the config and inputs of the run that owns this directory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from loguru import logger
from pydantic import Field, model_validator

from data_pipeline.jsonl import expand_inputs
from data_pipeline.steps import cleaning, filters
from data_pipeline.steps.dedup import ExactDedupFilter
from data_pipeline.steps.readers import HashShardJsonlReader, QuarantiningJsonlReader
from data_pipeline.steps.writers import JsonlDocWriter
from pretrain.config import Config


class CleanConfig(Config):
    """Settings of :func:`run_clean`."""

    text_key: str = "text"
    """Input field holding the document text."""
    id_key: str = "id"
    """Input field holding the document id (missing ids become ``<file>:<line>``)."""
    min_chars: int = Field(32, ge=0)
    """Documents shorter than this many characters after cleaning are dropped (``too_short``)."""
    max_chars: int = Field(1_000_000, ge=1)
    """Documents longer than this many characters after cleaning are dropped (``too_long``)."""
    max_line_chars: int = Field(10_000, ge=1)
    """Documents with a longer line are dropped (``long_line``): minified code, base64 blobs."""
    max_record_bytes: int = Field(16 * 2**20, ge=1)
    """Input lines longer than this are quarantined unparsed (``line_too_long``)."""
    max_non_printable_frac: float = Field(0.05, ge=0.0, le=1.0)
    """Documents with a larger fraction of control characters or U+FFFD are dropped (``non_printable``)."""
    strip_html: bool = True
    """Remove HTML tags, comments and script/style blocks (prose only; code is left alone)."""
    strip_urls: bool = True
    """Remove URLs (a Markdown link keeps its text; prose only, code is left alone)."""
    remove_control_chars: bool = True
    """Remove control characters, U+FFFD, zero-width spaces, BOMs and bidi overrides."""
    collapse_punctuation: bool = True
    """Collapse runs of 4+ ``!?,;`` to one and of dots to ``...`` (prose only)."""
    normalize_whitespace: bool = True
    """Normalise line ends and odd spaces, strip trailing whitespace, cap blank-line runs; never
    touches indentation."""
    max_blank_lines: int = Field(2, ge=0)
    """Longest run of blank lines kept by whitespace normalisation."""
    dedup: bool = True
    """Drop exact duplicates (hash of whitespace-normalised text); global across tasks."""
    compress_output: bool = False
    """Write ``output/*.jsonl.gz`` instead of plain ``output/*.jsonl``."""
    tasks: int = Field(1, ge=1)
    """Number of datatrove tasks (shards of the input lines)."""
    workers: int = Field(1, ge=1)
    """Tasks run at once; 1 runs in this process, more use a forkserver pool (entry script needs a
    ``__main__`` guard)."""
    quiet: bool = True
    """Silence datatrove's console logging (per-task log files are still written)."""

    @model_validator(mode="after")
    def _check_lengths(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})")
        return self


def _cleaning_steps(files: list[Path], output_dir: Path, cfg: CleanConfig) -> list[tuple[str, PipelineStep]]:
    steps: list[tuple[str, PipelineStep]] = [
        (
            "reader",
            QuarantiningJsonlReader(
                files,
                output_dir / "quarantine",
                text_key=cfg.text_key,
                id_key=cfg.id_key,
                max_record_bytes=cfg.max_record_bytes,
            ),
        ),
        ("non_printable_filter", filters.NonPrintableFilter(cfg.max_non_printable_frac)),
        ("code_tagger", cleaning.CodeTagger()),
    ]
    if cfg.strip_html:
        steps.append(("strip_html", cleaning.HtmlStripFormatter(skip_code=True)))
    if cfg.strip_urls:
        steps.append(("strip_urls", cleaning.UrlStripFormatter()))
    if cfg.remove_control_chars:
        steps.append(("remove_control_chars", cleaning.ControlCharFormatter()))
    if cfg.collapse_punctuation:
        steps.append(("collapse_punctuation", cleaning.PunctuationCollapseFormatter()))
    if cfg.normalize_whitespace:
        steps.append(("normalize_whitespace", cleaning.WhitespaceFormatter(cfg.max_blank_lines)))
    steps.append(("length_filter", filters.LengthFilter(cfg.min_chars, cfg.max_chars)))
    steps.append(("long_line_filter", filters.LongLineFilter(cfg.max_line_chars)))
    return steps


def _writer(folder: Path, cfg: CleanConfig, *, intermediate: bool) -> JsonlDocWriter:
    return JsonlDocWriter(
        folder, compress=cfg.compress_output and not intermediate, keep_internal=intermediate
    )


class _QuietLogs(PipelineStep):
    """First step of each task when ``quiet``: silences datatrove's loguru output in pool workers
    (which do not inherit the caller's setting). Not part of the statistics."""

    name = "🔇 quiet logs"
    type = "⚙️ - SETUP"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        logger.disable("datatrove")
        if data:
            yield from data


@contextmanager
def _quiet_datatrove(enabled: bool) -> Iterator[None]:
    if enabled:
        logger.disable("datatrove")
    try:
        yield
    finally:
        if enabled:
            logger.enable("datatrove")


def _check_owner(output_dir: Path, files: list[Path], cfg: CleanConfig) -> None:
    """Refuse to resume a directory that was started with other inputs or settings."""
    owner = {"inputs": [str(f.resolve()) for f in files], "config": cfg.to_dict()}
    for key in ("quiet", "workers"):  # may change between runs without changing the result
        owner["config"].pop(key)
    path = output_dir / "clean_config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != owner:
            raise ValueError(
                f"{output_dir} holds a run with other inputs or settings (see {path}); "
                "use a new output_dir or delete it to start over"
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(owner, indent=2))


def run_clean(inputs: list[Path], output_dir: Path, config: CleanConfig | None = None) -> dict:
    """Clean JSONL documents with datatrove; resumable (finished tasks are skipped on re-run).

    Args:
        inputs: JSONL files (plain or gzip) or directories of ``*.jsonl*`` files.
        output_dir: where output, quarantine, logs and ``stats.json`` go.
        config: settings (default :class:`CleanConfig()`).

    Returns:
        The statistics also written to ``output_dir/stats.json``: ``{"stages": {name: {"in",
        "kept", "dropped", "quarantined", "reasons", "counters"}}, "totals": {...}}`` with
        ``in == kept + dropped + quarantined`` for every stage and for the totals.

    Raises:
        ValueError: ``output_dir`` belongs to a run with other inputs or settings.
        FileNotFoundError: an input does not exist.
    """
    cfg = config or CleanConfig()
    output_dir = Path(output_dir)
    files = expand_inputs(inputs)
    _check_owner(output_dir, files, cfg)
    staging = output_dir / "_prededup"
    final = output_dir / "output"
    stage1 = _cleaning_steps(files, output_dir, cfg)
    if cfg.dedup:
        stage1.append(("prededup_writer", _writer(staging, cfg, intermediate=True)))
    else:
        stage1.append(("writer", _writer(final, cfg, intermediate=False)))
    stages: list[tuple[str, list[tuple[str, PipelineStep]]]] = [("clean", stage1)]
    if cfg.dedup:
        stage2 = [
            ("dedup_reader", HashShardJsonlReader(staging)),
            ("exact_dedup", ExactDedupFilter()),
            ("writer", _writer(final, cfg, intermediate=False)),
        ]
        stages.append(("dedup", stage2))

    with _quiet_datatrove(cfg.quiet):
        for stage_name, steps in stages:
            pipeline = [step for _, step in steps]
            if cfg.quiet and cfg.workers > 1:
                pipeline.insert(0, _QuietLogs())
            executor = LocalPipelineExecutor(
                pipeline,
                tasks=cfg.tasks,
                workers=cfg.workers,
                logging_dir=str(output_dir / "logs" / stage_name),
                skip_completed=True,
            )
            executor.run()
    if cfg.dedup and staging.exists():
        shutil.rmtree(staging)

    stats = collect_stats(output_dir, stages)
    tmp = output_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, output_dir / "stats.json")
    return stats


def _count(value: Any) -> int:
    """A datatrove stat is a bare number or a dict with a ``total``."""
    return int(value.get("total", 0) if isinstance(value, dict) else value)


def _stage_counts(raw: dict[str, Any]) -> dict[str, Any]:
    """Map one step's counters to ``in/kept/dropped/quarantined`` (filters and writers count
    ``total``/``forwarded`` instead of ``in``/``kept``)."""
    counts = {k: _count(v) for k, v in raw.items()}
    n_in = counts.get("in", counts.get("total", 0))
    dropped, quarantined = counts.get("dropped", 0), counts.get("quarantined", 0)
    kept = counts.get("kept", counts.get("forwarded", n_in - dropped - quarantined))
    reasons = {k: v for k, v in counts.items() if k.startswith(("dropped_", "quarantined_"))}
    hidden = {"in", "kept", "dropped", "quarantined", "total", "forwarded", "doc_len", "doc_len_tokens"}
    others = {k: v for k, v in counts.items() if k not in hidden and k not in reasons and "XXXXX" not in k}
    return {"in": n_in, "kept": kept, "dropped": dropped, "quarantined": quarantined, "reasons": reasons} | (
        {"counters": others} if others else {}
    )


def collect_stats(output_dir: Path, stages: list[tuple[str, list[tuple[str, PipelineStep]]]]) -> dict:
    """Sum datatrove's per-task stats files (``logs/<stage>/stats/*.json``) into per-step counts.

    Reading the per-task files (not the executor's return value) makes a fully skipped re-run
    report the same numbers as the run that did the work.
    """
    out: dict[str, Any] = {"stages": {}}
    for stage_name, steps in stages:
        sums: list[dict[str, int]] = [{} for _ in steps]
        for path in sorted((output_dir / "logs" / stage_name / "stats").glob("*.json")):
            per_step = [s for s in json.loads(path.read_text()) if s["name"] != str(_QuietLogs())]
            for i, step_stats in enumerate(per_step):
                for key, value in step_stats["stats"].items():
                    sums[i][key] = sums[i].get(key, 0) + _count(value)
        for (name, _), raw in zip(steps, sums):
            out["stages"][name] = _stage_counts(raw)
    per_stage = list(out["stages"].values())
    out["totals"] = {
        "in": per_stage[0]["in"],
        "kept": per_stage[-1]["kept"],
        "dropped": sum(s["dropped"] for s in per_stage),
        "quarantined": sum(s["quarantined"] for s in per_stage),
    }
    return out
