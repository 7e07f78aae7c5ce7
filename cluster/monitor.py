"""Run health for operators: stalled runs, non-finite losses and loss spikes, marked in MLflow.

A run that needs attention gets the tags ``health`` (``stalled``, ``nonfinite`` or ``spike``)
and ``health_reason``; a run flagged before and healthy now gets ``health=ok``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

LOSS = "train/loss"


def check_run(
    client: Any, run: Any, *, stall_seconds: float, spike_factor: float = 3.0, now: float | None = None
) -> tuple[str, str] | None:
    """``(health, reason)`` for a run that needs attention, else ``None``.

    stalled: the run is RUNNING and its last loss (or its start, when none) is older than
    ``stall_seconds``; nonfinite: a logged loss is NaN/inf; spike: the latest loss is above
    ``spike_factor`` x the median of the ten before it.
    """
    now = time.time() if now is None else now
    history = sorted(client.get_metric_history(run.info.run_id, LOSS), key=lambda m: (m.step, m.timestamp))
    bad = next((m for m in history if not math.isfinite(m.value)), None)
    if bad is not None:
        return "nonfinite", f"{LOSS} is {bad.value} at step {bad.step}"
    if len(history) >= 4:
        last, before = history[-1], [m.value for m in history[-11:-1]]
        ref = statistics.median(before)
        if ref > 0 and last.value > spike_factor * ref:
            return (
                "spike",
                f"{LOSS} {last.value:.4g} at step {last.step} is > {spike_factor:g} x median {ref:.4g}",
            )
    if run.info.status == "RUNNING":
        last_ms = max((m.timestamp for m in history), default=run.info.start_time or 0)
        idle = now - last_ms / 1000
        if idle > stall_seconds:
            step = history[-1].step if history else 0
            return "stalled", f"no new step for {idle:.0f} s (last step {step}; limit {stall_seconds:g} s)"
    return None


def monitor(
    tracking_uri: str,
    experiment: str,
    stall_seconds: float = 1800,
    *,
    spike_factor: float = 3.0,
    mark: bool = True,
    max_runs: int = 1000,
) -> list[tuple[str, str]]:
    """Check the experiment's runs; tag and return ``[(run_id, reason)]`` of those needing attention."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flagged: list[tuple[str, str]] = []
    runs = client.search_runs([exp.experiment_id], max_results=max_runs)
    for run in runs:
        found = check_run(client, run, stall_seconds=stall_seconds, spike_factor=spike_factor)
        run_id = run.info.run_id
        if found is not None:
            health, reason = found
            flagged.append((run_id, f"{health}: {reason}"))
            if mark:
                client.set_tag(run_id, "health", health)
                client.set_tag(run_id, "health_reason", reason)
        elif mark and run.data.tags.get("health", "ok") != "ok":
            client.set_tag(run_id, "health", "ok")
            client.set_tag(run_id, "health_reason", "")
    return flagged
