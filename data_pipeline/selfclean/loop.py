"""The self-cleaning loop (the TNL paper's step 3): train or load a small evaluation model, score
every document, drop those above a perplexity threshold, write what people review, repeat.

Layout of ``out_dir`` (one directory per round; a finished round has ``stats.json`` and is
skipped on a re-run, a half-finished one resumes its unfinished datatrove tasks)::

    round_<k>/eval_model/     tokenizer, shards and run directory of the round's evaluation model
    round_<k>/scores/         per-task perplexity arrays (<rank>.npy)
    round_<k>/kept/           kept documents (<rank>.jsonl), the next round's input
    round_<k>/dropped/        dropped documents with their scores
    round_<k>/review_kept.jsonl, review_dropped.jsonl, histogram.png, report.md, stats.json
    round_<k>/logs/{score,split}/   datatrove logs, stats and completion markers
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.jsonl import expand_inputs
from data_pipeline.selfclean.config import SelfCleanConfig
from data_pipeline.selfclean.report import (
    load_scores,
    percentiles,
    plot_histogram,
    threshold_of,
    write_report,
    write_review,
)
from data_pipeline.selfclean.scoring import PerplexityScorer
from data_pipeline.selfclean.steps import CleanJsonlReader, ThresholdSplitter
from data_pipeline.steps.writers import JsonlDocWriter
from data_pipeline.tokenize import PipelineRunner, local_runner, tokenize_parallel
from data_pipeline.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

#: Called after each round with ``(round, stats, round directory)`` (e.g. to log to MLflow).
RoundCallback = Callable[[int, dict[str, Any], Path], None]


def _train_config_path(ref: str) -> Path:
    path = Path(ref)
    if path.is_file():
        return path
    from configs import preset_path

    return preset_path(ref)


def train_eval_model(
    inputs: list[Path],
    out_dir: Path,
    config: SelfCleanConfig,
    *,
    runner: PipelineRunner,
    tasks: int,
    progress: bool = False,
) -> Path:
    """Tokenizer + shards + a short training run on ``inputs``; returns the run directory.

    Resumable: an existing tokenizer or shards are reused and training resumes from its latest
    checkpoint (a finished run returns at once).
    """
    from pretrain.run_config import RunConfig
    from pretrain.train import run_training

    prefix, tok_prefix, run_dir = out_dir / "tokens" / "corpus", out_dir / "tokenizer", out_dir / "run"
    train_path = _train_config_path(config.train_config)
    overrides = [
        "name=selfclean-eval",
        "tracking.enabled=false",
        *config.train_overrides,
        f"data.paths=[{prefix}]",
        f"data.tokenizer={tok_prefix}.model",
        f"run_dir={run_dir}",
    ]
    run_config = RunConfig.from_yaml(train_path, overrides)
    model = Path(f"{tok_prefix}.model")
    if not model.is_file():
        train_tokenizer(inputs, tok_prefix, vocab_size=run_config.model.vocab_size)
    if not Path(f"{prefix}.idx").is_file():
        tokenize_parallel(inputs, model, prefix, tasks=tasks, runner=runner)
    run_training(run_config, config_path=train_path, progress=progress)
    return run_dir


def _score_and_split(
    inputs: list[Path],
    rdir: Path,
    eval_model: Path,
    config: SelfCleanConfig,
    runner: PipelineRunner,
    tasks: int,
) -> dict[str, Any]:
    scorer = PerplexityScorer(
        eval_model,
        rdir / "scores",
        window=config.window,
        max_tokens=config.max_tokens,
        batch_windows=config.batch_windows,
        threads=config.threads,
        device=config.device,
    )
    runner(
        [CleanJsonlReader(inputs), scorer, JsonlDocWriter(rdir / "scored")], rdir / "logs" / "score", tasks
    )
    scores = load_scores(rdir / "scores")
    threshold = threshold_of(scores, config)
    splitter = ThresholdSplitter(
        threshold,
        rdir / "kept",
        rdir / "dropped",
        rdir / "review_parts",
        review_samples=config.review_samples,
        review_chars=config.review_chars,
        seed=config.seed,
    )
    scored = sorted((rdir / "scored").glob("*.jsonl"))
    runner([CleanJsonlReader(scored), splitter], rdir / "logs" / "split", tasks)
    counts = {"in": 0, "kept": 0, "dropped": 0}
    for path in sorted((rdir / "logs" / "split" / "stats").glob("*.json")):
        for entry in json.loads(path.read_text()):
            if entry["name"].endswith(ThresholdSplitter.name):
                for key in counts:
                    value = entry["stats"].get(key, 0)
                    counts[key] += int(value.get("total", 0) if isinstance(value, dict) else value)
    return {"threshold": threshold, "scores": scores, **counts}


def run_selfclean(
    inputs: list[Path],
    out_dir: Path,
    config: SelfCleanConfig,
    *,
    runner: PipelineRunner | None = None,
    tasks: int = 1,
    on_round: RoundCallback | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds over the cleaned JSONL ``inputs``.

    Args:
        inputs: cleaned JSONL files or directories.
        out_dir: the loop's directory (see the module docstring).
        config: the loop's settings.
        runner: runs a datatrove pipeline (default: local, one worker).
        tasks: datatrove tasks per stage.
        on_round: called after each round (also for rounds skipped on a re-run).
        progress: show the evaluation model's training progress bar.

    Returns:
        ``{"rounds": [per-round stats], "output": kept directory of the last round}``; each
        round's stats have ``in == kept + dropped``.
    """
    runner = runner or local_runner()
    out_dir = Path(out_dir)
    current = expand_inputs(inputs)
    rounds: list[dict[str, Any]] = []
    eval_model: Path | None = Path(config.eval_model) if config.eval_model else None
    for k in range(1, config.rounds + 1):
        rdir = out_dir / f"round_{k}"
        stats_path = rdir / "stats.json"
        if stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            logger.info("self-cleaning round %d reused (%s)", k, stats_path)
        else:
            if config.eval_model is None and (config.retrain or eval_model is None):
                eval_model = train_eval_model(
                    current, rdir / "eval_model", config, runner=runner, tasks=tasks, progress=progress
                )
            assert eval_model is not None
            result = _score_and_split(current, rdir, eval_model, config, runner, tasks)
            scores = result.pop("scores")
            if result["in"] != result["kept"] + result["dropped"] or result["in"] != len(scores):
                raise RuntimeError(f"round {k}: counts do not reconcile: {result}, {len(scores)} scores")
            rule = f"quantile {config.quantile}" if config.max_perplexity is None else "max_perplexity"
            stats = {
                "round": k,
                "eval_model": str(eval_model),
                "rule": rule,
                **result,
                "percentiles": percentiles(scores),
            }
            plot_histogram(
                scores,
                result["threshold"],
                rdir / "histogram.png",
                bins=config.histogram_bins,
                title=f"round {k}",
            )
            review = write_review(rdir / "review_parts", rdir, config)
            write_report(rdir, stats, review)
            shutil.rmtree(rdir / "scored", ignore_errors=True)  # the kept/dropped files hold the scores
            shutil.rmtree(rdir / "review_parts", ignore_errors=True)
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats, indent=2))
            tmp.replace(stats_path)
        eval_model = Path(stats["eval_model"])
        rounds.append(stats)
        if on_round:
            on_round(k, stats, rdir)
        current = sorted((rdir / "kept").glob("*.jsonl"))
    return {"rounds": rounds, "output": str(out_dir / f"round_{config.rounds}" / "kept")}
