"""MLflow tags that tie a run to its SLURM job: job id, nodes, restart count, code, config."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from pretrain.trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from pretrain.run_config import RunConfig

logger = logging.getLogger(__name__)


def run_tags(config: RunConfig | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``slurm_job_id``, ``slurm_nodelist``, ``slurm_restart_count``, ``slurm_ntasks`` (when under
    SLURM), ``code_version`` and ``config_hash`` (when ``config`` is given)."""
    from checkpoints import code_version

    env = os.environ if environ is None else environ
    tags = {"code_version": code_version()}
    if config is not None:
        tags["config_hash"] = config.config_hash()
    if env.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = env["SLURM_JOB_ID"]
        tags["slurm_restart_count"] = env.get("SLURM_RESTART_COUNT", "0") or "0"
        for key in ("SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT"):
            if env.get(key):
                tags[key.lower().replace("slurm_job_", "slurm_")] = env[key]
    return tags


class RunTagsCallback(Callback):
    """Re-applies ``tags`` to the MLflow run on every start, resumes included (MLflowCallback
    sets its tags only when it creates the run, so a requeued job's restart count would be lost)."""

    priority = 150  # pre_train after MLflowCallback has opened the run

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def pre_train(self) -> None:
        mlf = self.trainer.callbacks.get("mlflow")
        run_id = getattr(mlf, "run_id", None)
        if not self.trainer.is_main or run_id is None:
            return
        from mlflow.entities import RunTag
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(mlf.tracking_uri).log_batch(
                run_id, tags=[RunTag(k, str(v)) for k, v in self.tags.items()]
            )
        except Exception as exc:  # tags are bookkeeping; never stop training for them
            logger.warning("could not tag MLflow run %s: %s", run_id, exc)
