"""MLflow for a data job: one run per job (resumed on a re-run), the config as params, stage
counts as metrics, and per self-cleaning round (the round is the step) the threshold, the
in/kept/dropped counts and the perplexity percentiles, with the round's report files as artifacts.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from pretrain.tracking import TrackingConfig, flatten_params, get_or_create_experiment, resolve_tracking_uri

logger = logging.getLogger(__name__)

MAX_PARAMS = 100  # MLflow's limit of params per log_batch call
#: Files of a round directory logged as artifacts under ``selfclean/round_<k>/``.
ROUND_ARTIFACTS = ("report.md", "histogram.png", "review_kept.jsonl", "review_dropped.jsonl", "stats.json")


def round_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one self-cleaning round."""
    metrics = {f"selfclean/{k}": float(stats[k]) for k in ("threshold", "in", "kept", "dropped")}
    metrics["selfclean/kept_fraction"] = stats["kept"] / stats["in"] if stats["in"] else 0.0
    metrics.update({f"selfclean/perplexity_{k}": v for k, v in stats.get("percentiles", {}).items()})
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


class DataTracker:
    """Records a data job in MLflow; every method is a no-op when tracking is disabled.

    Args:
        config: the ``tracking`` section.
        out_dir: the job's output directory (holds ``mlflow_run_id``; the default sqlite store
            and its artifacts live there too).
        run_name: MLflow run name when ``config.run_name`` is unset.
        params: the resolved config, logged flattened when the run is created.
    """

    def __init__(
        self, config: TrackingConfig, out_dir: Path, *, run_name: str, params: dict[str, Any]
    ) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self.uri: str | None = None
        if not config.enabled:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(config, out_dir)
        self.client = MlflowClient(self.uri)
        id_file = out_dir / "mlflow_run_id"
        if id_file.is_file():
            try:
                self.run_id = self.client.get_run(id_file.read_text().strip()).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # the store was replaced: start a new run
                self.run_id = None
        if self.run_id is None:
            local = self.uri.startswith("sqlite:")
            location = (out_dir / "mlartifacts").resolve().as_uri() if local else None
            exp_id = get_or_create_experiment(self.client, config.experiment, location)
            self.run_id = self.client.create_run(exp_id, run_name=config.run_name or run_name).info.run_id
            items = [Param(k, v) for k, v in flatten_params(params).items()]
            for i in range(0, len(items), MAX_PARAMS):
                self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS])
            id_file.write_text(self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()]
        )

    def log_round(self, k: int, stats: dict[str, Any], round_dir: Path) -> None:
        """Round ``k``'s metrics at step ``k`` and its report files as artifacts."""
        if self.client is None:
            return
        self.log_metrics(round_metrics(stats), step=k)
        for name in ROUND_ARTIFACTS:
            if (round_dir / name).is_file():
                self.client.log_artifact(
                    self.run_id, str(round_dir / name), artifact_path=f"selfclean/round_{k}"
                )

    def finish(self, artifacts: list[Path]) -> dict[str, str | None]:
        """Log ``artifacts``, end the run; returns ``mlflow_run_id`` and ``mlflow_tracking_uri``."""
        if self.client is not None:
            for path in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id)
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri}
