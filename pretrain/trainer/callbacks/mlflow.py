"""Records the run in MLflow from the main rank: resolved config as params, config and
tokenizer as artifacts, metrics in batches (one REST call per collection, never one per metric)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pretrain.tracking import default_artifact_location, flatten_params, get_or_create_experiment
from pretrain.trainer.callbacks.base import Callback

logger = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MAX_PARAMS = 100  # ... and of params per call


class MLflowCallback(Callback):
    """Starts (or, after a restart, reopens) the MLflow run and streams metrics to it.

    Args:
        tracking_uri: where to record.
        experiment: experiment name.
        run_name: the run's display name.
        params: the resolved config (nested dict), logged flattened as params.
        artifacts: files logged under ``artifacts/<subdir>``: ``{subdir: [paths]}``.
        tags: extra run tags.
        run_id_file: where the run id is kept, so a re-run of the same command continues the
            same MLflow run even if it died before its first checkpoint.
        system_metrics: enable MLflow's system metrics sampler.
    """

    priority = 100  # after evaluation and checkpointing have recorded their final metrics

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        artifacts: dict[str, list[Path]] | None = None,
        tags: dict[str, str] | None = None,
        run_id_file: Path | None = None,
        system_metrics: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.params = params
        self.artifacts = artifacts or {}
        self.tags = tags or {}
        self.run_id_file = run_id_file
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self._client: Any = None
        self._buffer: list[Any] = []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def pre_train(self) -> None:
        if not self.trainer.is_main:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        # Only the client is pointed at the store: mlflow.set_tracking_uri would also export
        # MLFLOW_TRACKING_URI to this process and redirect every later run started in it.
        self._client = MlflowClient(self.tracking_uri)
        if self.run_id is None and self.run_id_file is not None and self.run_id_file.is_file():
            self.run_id = self.run_id_file.read_text().strip() or None
        resumed = self.run_id is not None
        if resumed:
            try:
                self._client.get_run(self.run_id)
            except Exception:  # the store was replaced: start afresh rather than fail the run
                logger.warning(
                    "MLflow run %s not found at %s; starting a new run", self.run_id, self.tracking_uri
                )
                self.run_id, resumed = None, False
        if self.run_id is None:
            exp_id = get_or_create_experiment(
                self._client, self.experiment, default_artifact_location(self.tracking_uri)
            )
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            self._log_params()
            for subdir, paths in self.artifacts.items():
                for path in paths:
                    if Path(path).is_file():
                        self._client.log_artifact(self.run_id, str(path), artifact_path=subdir)
        else:
            self._client.update_run(self.run_id, status="RUNNING")
            self._client.set_tag(self.run_id, "resumed_at_step", str(self.trainer.step))
        if self.run_id_file is not None:
            self.run_id_file.write_text(self.run_id)
        if self.system_metrics:  # the sampler runs through the fluent API
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
        self.trainer.results["mlflow_run_id"] = self.run_id
        self.trainer.results["mlflow_tracking_uri"] = self.tracking_uri

    def _log_params(self) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(self.params).items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, v, ts, step) for k, v in metrics.items())
        if len(self._buffer) >= MAX_BATCH or step % self.trainer.log_interval == 0:
            self._flush()

    def _flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def post_train(self) -> None:
        if self._client is None:
            return
        self._flush()
        summary = {k: v for k, v in self.trainer.results.items() if isinstance(v, (int, float))}
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id,
            metrics=[Metric(f"summary/{k}", float(v), ts, self.trainer.step) for k, v in summary.items()],
        )

    def on_error(self, exc: BaseException) -> None:
        if self._client is None:
            return
        try:
            self._flush()
            self._client.set_tag(self.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self._client.set_terminated(self.run_id, status=status)
        except Exception:  # never mask the training error with a tracking error
            logger.exception("could not record the failure in MLflow")
        self._client = None

    def close(self) -> None:
        if self._client is None:
            return
        self._flush()
        if self.system_metrics:
            import mlflow

            mlflow.end_run()
        self._client.set_terminated(self.run_id, status="FINISHED")
        self._client = None
