"""The bitext pipeline on datatrove: readers -> normalise -> pair filters -> dedup -> language
check -> group writer, run by a datatrove executor (local by default, SLURM job arrays with a
:class:`~data_pipeline.executors.SlurmExecutorFactory`), then merged into one file per group.

Work files under ``out_dir``: ``quarantine/<rank>.jsonl`` (bad input lines with their reason),
``dropped/language/`` (pairs dropped by the language check, for review), ``logs/bitext/``
(datatrove's logs and per-task stats). Each call starts afresh (``prepare`` is not resumable).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep
from loguru import logger

from data_pipeline.bitext.config import TSV, BitextConfig, BitextInput
from data_pipeline.bitext.readers import BitextFileReader, GettextPairReader, tsv_header
from data_pipeline.bitext.steps import (
    PairCleanFilter,
    PairDedupFilter,
    PairGroupWriter,
    PairLanguageFilter,
    PairNormalizer,
)
from data_pipeline.executors import ExecutorFactory
from data_pipeline.jsonl import check_readable, open_binary

STAGE = "bitext"
_WORK = "_work"

Rows = list[dict[str, Any]]


def resolve_inputs(inputs: list[BitextInput]) -> list[BitextInput]:
    """Check every input before the run (exists, readable) and give each TSV its languages
    (from the spec, else its header line).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a TSV names its languages nowhere.
        data_pipeline.jsonl.MissingDependencyError: a zstd input without ``zstandard``.
    """
    out = []
    for spec in inputs:
        path = Path(spec.path)
        if not path.is_file():
            raise FileNotFoundError(f"bitext input not found: {path}")
        check_readable(path)
        if spec.format == TSV and spec.langs is None:
            with open_binary(path) as f:
                header = tsv_header(f.readline(4096))
            if header is None:
                raise ValueError(
                    f"{path}: a TSV needs its languages: --input en-de:{path}, or a first line 'en<TAB>de'"
                )
            spec = spec.model_copy(update={"src_lang": header[0], "tgt_lang": header[1]})
        out.append(spec)
    return out


def pipeline_steps(
    cfg: BitextConfig, out_dir: Path, inputs: list[BitextInput]
) -> list[tuple[str, PipelineStep]]:
    """The named datatrove steps of one task."""
    steps: list[tuple[str, PipelineStep]] = []
    if cfg.use_gettext:
        steps.append(("gettext_reader", GettextPairReader(cfg.langs, cfg.locale_root)))
    if inputs:
        reader = BitextFileReader(inputs, out_dir / "quarantine", max_record_bytes=cfg.max_record_bytes)
        steps.append(("file_reader", reader))
    steps.append(("normalise", PairNormalizer()))
    steps.append(("pair_filters", PairCleanFilter(cfg.langs, cfg.clean)))
    if cfg.dedup:
        steps.append(("dedup", PairDedupFilter()))
    lc = cfg.language_check
    if lc.enabled:
        writer = None
        if cfg.keep_dropped:
            from datatrove.pipeline.writers import JsonlWriter

            folder = str(out_dir / "dropped" / "language")
            writer = JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)
        check = PairLanguageFilter(lc.threshold, lc.min_chars, lc.also_accept, exclusion_writer=writer)
        steps.append(("language_check", check))
    writer_step = PairGroupWriter(out_dir / _WORK, cfg.langs, cfg.group_of(), cfg.heldout_fraction)
    steps.append(("group_writer", writer_step))
    return steps


def _read_rows(folder: Path) -> Rows:
    rows: Rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f)
    rows.sort(key=lambda r: r["order"])  # source order, whatever the number of tasks
    for r in rows:
        del r["order"]
    return rows


def merge_groups(
    work: Path, group_names: list[str], cap: int | None
) -> tuple[dict[str, Rows], Rows, Counter]:
    """``(train pairs per group, held-out pairs, train pairs per direction)`` from the group
    writer's per-task files, in source order, at most ``cap`` training pairs per direction."""
    kept: Counter = Counter()
    groups: dict[str, Rows] = {}
    for name in group_names:
        groups[name] = []
        for row in _read_rows(work / "groups" / name):
            direction = f"{row['src_lang']}-{row['tgt_lang']}"
            if cap is None or kept[direction] < cap:
                kept[direction] += 1
                groups[name].append(row)
    return groups, _read_rows(work / "heldout"), kept


def _summary(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    drops: Counter = Counter()
    quarantined: Counter = Counter()
    for s in steps.values():
        for key, n in s.get("reasons", {}).items():
            kind, _, reason = key.partition("_")
            (drops if kind == "dropped" else quarantined)[reason] += n
    messages = steps.get("gettext_reader", {}).get("counters", {}).get("messages", 0)
    messages += steps.get("file_reader", {}).get("kept", 0)
    return {"messages": messages, "drops": dict(drops), "quarantined": dict(quarantined)}


def build_pairs(
    cfg: BitextConfig, out_dir: Path, *, executor_factory: ExecutorFactory | None = None
) -> tuple[dict[str, Rows], Rows, dict[str, Any]]:
    """Run the pipeline into ``out_dir``; ``(train pairs per group, held-out pairs, stats)``.

    Stats: ``messages`` (gettext messages plus good input lines), ``train_pairs`` per direction,
    ``heldout_pairs``, ``drops`` and ``quarantined`` per reason (a pair counts once, whichever
    direction it is written in), and ``steps`` (datatrove's per-step ``in``/``kept``/``dropped``/
    ``quarantined``/``reasons``/``counters``).
    """
    from data_pipeline.clean import _QuietLogs, collect_stats

    out_dir = Path(out_dir)
    inputs = resolve_inputs(cfg.inputs)
    for sub in (_WORK, "quarantine", "dropped/language", f"logs/{STAGE}"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    named = pipeline_steps(cfg, out_dir, inputs)
    pipeline: list[Any] = [step for _, step in named]
    if cfg.workers > 1:
        pipeline.insert(0, _QuietLogs())  # pool workers do not inherit this process's log setting
    factory = executor_factory or ExecutorFactory()
    executor = factory.build(
        pipeline, name=STAGE, tasks=cfg.tasks, workers=cfg.workers, logging_dir=out_dir / "logs" / STAGE
    )
    logger.disable("datatrove")
    try:
        factory.run_chain([executor])
    finally:
        logger.enable("datatrove")
    steps = collect_stats(out_dir, [(STAGE, named)])["stages"]
    names = list(dict.fromkeys(cfg.group_of().values()))
    groups, heldout, kept = merge_groups(out_dir / _WORK, names, cfg.max_pairs_per_direction)
    shutil.rmtree(out_dir / _WORK, ignore_errors=True)
    stats = _summary(steps)
    stats |= {"train_pairs": dict(sorted(kept.items())), "heldout_pairs": len(heldout)}
    stats["empty_groups"] = [name for name, rows in groups.items() if not rows]
    stats["steps"] = steps
    return groups, heldout, stats


def input_langs(inputs: list[BitextInput]) -> list[str]:
    """The languages the inputs declare (specs or TSV headers), ``en`` first: the default
    ``langs`` of a run on these inputs.

    Raises:
        ValueError: a JSONL input declares none (its lines name them): give ``langs``.
    """
    langs: list[str] = []
    for spec in resolve_inputs(inputs):
        if spec.langs is None:
            raise ValueError(f"{spec.path} names its languages per line: give the languages (--langs)")
        langs += [lang for lang in spec.langs if lang not in langs]
    return sorted(langs, key=lambda lang: lang != "en")
