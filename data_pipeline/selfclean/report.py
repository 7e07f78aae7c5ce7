"""A round's threshold from the per-task scores, and what people review: the score histogram
(PNG), the review samples of kept and dropped documents (JSONL) and a Markdown report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.selfclean.config import SelfCleanConfig

#: Percentiles of the perplexity listed in the report and in the round's stats.
PERCENTILES = (1, 10, 50, 90, 99)


def load_scores(scores_dir: Path) -> np.ndarray:
    """All perplexities of a round (the per-task ``<rank>.npy`` arrays, in rank order)."""
    parts = [np.load(p) for p in sorted(Path(scores_dir).glob("[0-9]*.npy"))]
    return np.concatenate(parts) if parts else np.zeros(0)


def threshold_of(scores: np.ndarray, config: SelfCleanConfig) -> float:
    """``max_perplexity``, or the ``quantile`` of the finite scores (``inf`` when there are none)."""
    if config.max_perplexity is not None:
        return float(config.max_perplexity)
    finite = scores[np.isfinite(scores)]
    return float(np.quantile(finite, config.quantile)) if finite.size else math.inf


def percentiles(scores: np.ndarray) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if not finite.size:
        return {}
    return {f"p{q}": float(np.percentile(finite, q)) for q in PERCENTILES}


def plot_histogram(scores: np.ndarray, threshold: float, path: Path, *, bins: int, title: str) -> None:
    """Histogram of log10 perplexity, kept and dropped in two colours, the threshold as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if finite.size:
        logs = np.log10(np.maximum(finite, 1e-9))
        edges = np.histogram_bin_edges(logs, bins=bins)
        kept = logs[finite <= threshold]
        dropped = logs[finite > threshold]
        ax.hist(
            [kept, dropped], bins=edges, stacked=True, color=["#4c72b0", "#dd8452"], label=["kept", "dropped"]
        )
        if math.isfinite(threshold):
            ax.axvline(
                math.log10(threshold), color="black", linestyle="--", label=f"threshold {threshold:.4g}"
            )
        ax.legend()
    ax.set_xlabel("log10 perplexity")
    ax.set_ylabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_review(review_dir: Path, out_dir: Path, config: SelfCleanConfig) -> dict[str, list[dict]]:
    """Merge the per-task review reservoirs into ``review_kept.jsonl`` and ``review_dropped.jsonl``
    (a seeded sample of ``review_samples`` each, sorted by perplexity, highest first)."""
    pools: dict[bool, list[dict]] = {True: [], False: []}
    for path in sorted(Path(review_dir).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pools[record["kept"]].append(record)
    rng = random.Random(config.seed)
    out = {}
    for kept, name in ((True, "kept"), (False, "dropped")):
        pool = sorted(pools[kept], key=lambda r: r["id"])
        sample = rng.sample(pool, min(config.review_samples, len(pool)))
        sample.sort(key=lambda r: -(r["perplexity"] if r["perplexity"] is not None else math.inf))
        with open(out_dir / f"review_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sample)
        out[name] = sample
    return out


def _cell(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    flat = flat[:limit] + ("…" if len(flat) > limit else "")
    return flat.replace("|", "\\|").replace("<", "&lt;")


def write_report(out_dir: Path, stats: dict[str, Any], review: dict[str, list[dict]]) -> Path:
    """``report.md``: counts, threshold, percentiles, the histogram and the review samples."""
    lines = [
        f"# Self-cleaning round {stats['round']}",
        "",
        f"Evaluation model: `{stats['eval_model']}`",
        "",
        "| documents in | kept | dropped | threshold (perplexity) | rule |",
        "|---|---|---|---|---|",
        f"| {stats['in']} | {stats['kept']} | {stats['dropped']} | {stats['threshold']:.4g} | {stats['rule']} |",
        "",
        "| " + " | ".join(stats["percentiles"]) + " |",
        "|" + "---|" * len(stats["percentiles"]),
        "| " + " | ".join(f"{v:.4g}" for v in stats["percentiles"].values()) + " |",
        "",
        "![perplexity histogram](histogram.png)",
        "",
    ]
    for name in ("dropped", "kept"):
        lines += [
            f"## Review sample: {name} ({len(review[name])}, file `review_{name}.jsonl`)",
            "",
            "| perplexity | tokens | id | text |",
            "|---|---|---|---|",
        ]
        for r in review[name]:
            ppl = r["perplexity"]
            lines.append(f"| {ppl:.4g} | {r['tokens']} | {_cell(str(r['id']), 60)} | {_cell(r['text'])} |")
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
