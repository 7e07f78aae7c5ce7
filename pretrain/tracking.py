"""MLflow tracking: the ``tracking`` config section, URI resolution and run start/resume.

The embedded default is a sqlite store inside the run directory (no server needed); any MLflow
tracking URI works (``http://host:port`` for an operators' server, ``postgresql://...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pretrain.config import Config


class TrackingConfig(Config):
    """Where runs are recorded."""

    enabled: bool = True
    """Record the run in MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI; ``None`` uses $MLFLOW_TRACKING_URI, else ``sqlite:///<run_dir>/mlflow.db``."""
    experiment: str = "pretrain"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; ``None`` uses the run config's ``name``."""
    system_metrics: bool = False
    """Also log CPU/GPU/memory system metrics (MLflow's sampler, psutil/pynvml)."""


def resolve_tracking_uri(config: TrackingConfig, run_dir: Path) -> str:
    if config.tracking_uri:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local sqlite store (``mlartifacts/``
    next to the ``.db`` file), else wherever the server decides (``None``). Without this MLflow
    would write them to ``./mlruns`` in whatever directory the run was started from."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of MLflow experiment ``name`` through ``client``, created (with
    ``artifact_location``, e.g. :func:`default_artifact_location`) when it does not exist."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten_params(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(data)[:6000]
    return out


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on ``tracking_uri``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
