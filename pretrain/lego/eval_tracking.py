"""Evaluation scores as MLflow runs: BLEU and chrF per direction and their averages.

Each evaluation is one run (metrics ``bleu_<src>-<tgt>``, ``chrf_<src>-<tgt>``, ``bleu_avg``,
``chrf_avg``, sent in one ``log_batch``), by default in the sqlite store of the run the flow
came from, so training and its evaluations sit side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pretrain.tracking import (
    TrackingConfig,
    default_artifact_location,
    get_or_create_experiment,
    resolve_tracking_uri,
)

EVAL_EXPERIMENT = "lego-mt-eval"


def averages(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean BLEU and chrF over the directions (each direction counts once)."""
    n = max(1, len(scores))
    return {k: sum(s[k] for s in scores.values()) / n for k in ("bleu", "chrf")}


def score_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"bleu_en-de": ..., "chrf_en-de": ..., "bleu_avg": ..., "chrf_avg": ...}``."""
    out = {f"{k}_{d}": float(s[k]) for d, s in scores.items() for k in ("bleu", "chrf")}
    out.update({f"{k}_avg": v for k, v in averages(scores).items()})
    return out


def default_store_dir(flow_meta: dict[str, Any], flow_dir: Path) -> Path:
    """The source run of a flow (recorded by ``save_flow``) when it still exists, else the flow
    directory itself."""
    source = flow_meta.get("run_dir")
    if source and Path(source).is_dir():
        return Path(source)
    return Path(flow_dir)


def resolve_eval_uri(tracking_uri: str | None, store_dir: Path) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<store_dir>/mlflow.db``."""
    return resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri), Path(store_dir))


def log_scores(
    scores: dict[str, dict[str, float]],
    *,
    tracking_uri: str,
    experiment: str = EVAL_EXPERIMENT,
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Record ``scores`` as one finished MLflow run; returns its id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, default_artifact_location(tracking_uri))
    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in score_metrics(scores).items()]
    metrics += [Metric(f"n_{d}", float(s["n"]), ts, 0) for d, s in scores.items()]
    items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(metrics), len(items), 1), 100):  # MLflow's per-call limits
        client.log_batch(
            run_id, metrics=metrics[i : i + 100], params=items[i : i + 100], tags=run_tags if i == 0 else []
        )
    client.set_terminated(run_id)
    return run_id
