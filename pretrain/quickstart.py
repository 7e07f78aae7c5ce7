"""The main job: raw text to a trained TransNormerLLM, end to end, on embedded defaults.

Stages (each recorded in ``OUT/stages/<name>.json`` and skipped on a re-run when its inputs
and settings are unchanged; training resumes from its latest checkpoint):

1. corpus    - Python standard library docstrings and sources (or the user's JSONL/text files)
2. clean     - rule-based cleaning, quality filters and exact dedup (datatrove)
3. tokenizer - SentencePiece BPE with byte fallback
4. tokenize  - Megatron ``.bin/.idx`` shards
5. train     - ``configs/tnl-tiny.yaml`` with data and run directory under OUT
6. sample    - a short generation from the saved checkpoint with the recurrent decoder
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import preset_path
from data_pipeline.clean import CleanConfig, run_clean
from data_pipeline.corpus import build_stdlib_corpus
from data_pipeline.tokenize import tokenize_to_megatron
from data_pipeline.tokenizer import train_tokenizer
from pretrain.run_config import RunConfig
from pretrain.tracking import ui_command

logger = logging.getLogger(__name__)

SAMPLE_PROMPT = 'def read_config(path):\n    """Return the'


def _run_stage(
    out: Path, name: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``fn`` unless a finished record with the same ``params`` exists."""
    record = out / "stages" / f"{name}.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("params") == params:
            logger.info("stage %-9s reused (%s)", name, record)
            return saved["result"]
    start = time.perf_counter()
    result = fn()
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"params": params, "result": result, "seconds": time.perf_counter() - start}, indent=2)
    )
    tmp.replace(record)
    logger.info("stage %-9s done in %.1fs", name, time.perf_counter() - start)
    return result


def _texts_to_jsonl(inputs: list[Path], out_path: Path) -> dict[str, Any]:
    """User inputs: ``.jsonl``/``.jsonl.gz`` files pass through; text files and directories of
    them become one document per file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    docs = 0
    with out_path.open("w") as f:
        for src in inputs:
            files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
            for path in files:
                if path.name.endswith((".jsonl", ".jsonl.gz")):
                    continue
                text = path.read_text(errors="replace")
                f.write(json.dumps({"id": str(path), "text": text, "source": "user"}) + "\n")
                docs += 1
    return {"documents": docs}


def run_quickstart(
    out: Path = Path("runs/quickstart"),
    *,
    inputs: list[Path] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage into ``out``; returns the summary also written to ``out/summary.json``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"

    # 1. corpus
    if inputs:
        jsonl_inputs = [p for p in inputs if p.name.endswith((".jsonl", ".jsonl.gz"))]
        params = {"inputs": [str(p.resolve()) for p in inputs]}
        _run_stage(out, "corpus", params, lambda: _texts_to_jsonl(inputs, data / "raw" / "user.jsonl"))
        raw = [*jsonl_inputs, data / "raw" / "user.jsonl"]
    else:
        raw_path = data / "raw" / "stdlib.jsonl"
        _run_stage(out, "corpus", {"source": "stdlib"}, lambda: build_stdlib_corpus(raw_path))
        raw = [raw_path]

    # 2. clean + dedup
    clean_cfg = CleanConfig()
    clean_params = {"raw": [str(p) for p in raw], "config": clean_cfg.to_dict()}
    clean_stats = _run_stage(out, "clean", clean_params, lambda: run_clean(raw, data / "clean", clean_cfg))
    cleaned = sorted((data / "clean" / "output").glob("*.jsonl*"))

    # 3-4. tokenizer and shards; the model's vocabulary comes from the tnl-tiny preset
    config = RunConfig.from_yaml(
        preset_path("tnl-tiny"),
        [
            f"data.paths=[{data / 'tokens' / 'corpus'}]",
            f"data.tokenizer={data / 'tokenizer' / 'tokenizer.model'}",
            f"run_dir={out / 'run'}",
            "name=quickstart",
            *(overrides or []),
        ],
    )
    vocab = config.model.vocab_size
    tok_model = _run_stage(
        out,
        "tokenizer",
        {"clean": clean_params, "vocab_size": vocab},
        lambda: {"model": str(train_tokenizer(cleaned, data / "tokenizer" / "tokenizer", vocab_size=vocab))},
    )["model"]
    tokens = _run_stage(
        out,
        "tokenize",
        {"clean": clean_params, "tokenizer": tok_model},
        lambda: tokenize_to_megatron(cleaned, Path(tok_model), data / "tokens" / "corpus"),
    )

    # 5. train (resumes from the latest checkpoint by itself)
    from pretrain.train import run_training

    results = run_training(config, config_path=preset_path("tnl-tiny"), progress=progress)

    # 6. sample from the saved checkpoint with the recurrent decoder
    sample = generate_sample(results["checkpoint"])

    summary = {
        "mlflow_tracking_uri": results.get("mlflow_tracking_uri"),
        "mlflow_run_id": results.get("mlflow_run_id"),
        "checkpoint_dir": results["checkpoint_dir"],
        "checkpoint": results["checkpoint"],
        "initial_loss": results.get("initial_loss"),
        "final_loss": results.get("final_loss"),
        "heldout_loss": results.get("heldout_loss"),
        "heldout_perplexity": results.get("heldout_perplexity"),
        "tokens_per_second": results.get("tokens_per_second"),
        "mfu_percent": results.get("mfu_percent"),
        "peak_memory_gib": results.get("peak_memory_gib"),
        "num_params": results.get("num_params"),
        "corpus": {"clean": clean_stats.get("totals", clean_stats), "tokens": tokens},
        "sample": sample,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def generate_sample(
    checkpoint: str | Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 48
) -> dict[str, str]:
    from pretrain.generate import SamplingConfig, generate
    from pretrain.inference import load_model

    loaded = load_model(checkpoint)
    ids = loaded.tokenizer.encode(prompt)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.8,
        top_k=40,
        seed=0,
        stop_token_ids=(loaded.tokenizer.eod,),
    )
    new = list(generate(loaded.model, ids, sampling))
    return {"prompt": prompt, "completion": loaded.tokenizer.decode(new)}


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quickstart", show_header=False)
    for key in (
        "initial_loss",
        "final_loss",
        "heldout_perplexity",
        "tokens_per_second",
        "mfu_percent",
        "peak_memory_gib",
        "num_params",
        "checkpoint",
        "mlflow_run_id",
        "seconds",
    ):
        value = summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print("[bold]sample[/bold] (recurrent decoder, from the saved checkpoint):")
    console.print(
        summary["sample"]["prompt"] + summary["sample"]["completion"], markup=False, highlight=False
    )
    if summary.get("mlflow_tracking_uri"):
        console.print(f"\nOpen the MLflow UI: {ui_command(summary['mlflow_tracking_uri'])}", markup=False)
