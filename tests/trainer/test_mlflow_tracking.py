"""Every run is an MLflow run on a real tracking server: resolved config as params, per-step
metrics, config and tokenizer as artifacts; a resumed run continues the same MLflow run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pretrain.tracking import flatten_params
from pretrain.train import run_training
from tests.conftest import tiny_config


def test_run_is_recorded_on_tracking_server(
    tiny_corpus: dict[str, Path], mlflow_server: str, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_corpus,
        tmp_path / "run",
        **{
            "tracking.enabled": True,
            "tracking.tracking_uri": mlflow_server,
            "tracking.experiment": "tests",
            "train.steps": 6,
            "train.log_interval": 3,
            "checkpoint.interval": 3,
        },
    )
    results = run_training(config, progress=False)
    client = MlflowClient(mlflow_server)
    run = client.get_run(results["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert results["mlflow_tracking_uri"] == mlflow_server

    # The whole resolved config is there, key for key.
    expected = flatten_params(config.to_dict())
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.tags["config_hash"] == config.config_hash()

    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4, 5, 6]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "throughput/tokens_per_second")} == {
        3,
        6,
    }
    assert run.data.metrics["eval/perplexity"] > 1
    assert run.data.metrics["summary/final_loss"] == results["final_loss"]

    artifacts = {a.path for d in ("config", "tokenizer") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/config.yaml", "tokenizer/" + Path(config.data.tokenizer).name} <= artifacts

    # Re-running continues the same MLflow run instead of starting a second one.
    again = run_training(config, progress=False)
    assert again["mlflow_run_id"] == results["mlflow_run_id"]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_default_store_is_sqlite_in_run_dir(
    tiny_corpus: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(tiny_corpus, tmp_path / "run", **{"tracking.enabled": True, "train.steps": 2})
    results = run_training(config, progress=False)
    assert results["mlflow_tracking_uri"] == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    run = MlflowClient(results["mlflow_tracking_uri"]).get_run(results["mlflow_run_id"])
    assert run.data.params["train.steps"] == "2"
    # Artifacts sit beside the store, not in ./mlruns of whatever directory the run started in.
    artifacts = tmp_path / "run" / "mlartifacts"
    assert run.info.artifact_uri.startswith(artifacts.resolve().as_uri())
    assert list(artifacts.rglob("config.yaml"))


def test_tracking_does_not_leak_into_the_environment(
    tiny_corpus: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_training(
        tiny_config(tiny_corpus, tmp_path / "run", **{"tracking.enabled": True, "train.steps": 1}),
        progress=False,
    )
    assert "MLFLOW_TRACKING_URI" not in os.environ
