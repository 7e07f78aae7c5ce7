"""Operators' MLflow: the server command and run health monitoring, against real servers."""

from __future__ import annotations

import math
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.mlflow_server import serve, server_command
from cluster.monitor import monitor
from pretrain.config import ConfigError
from tests.conftest import free_port

from .conftest import run_cli


def test_server_command_defaults_to_localhost_and_one_worker(tmp_path: Path) -> None:
    cmd = server_command("postgresql://u@db/mlflow", tmp_path / "art")
    assert cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"
    assert cmd.argv[cmd.argv.index("--workers") + 1] == "1"
    assert cmd.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--app-name" not in cmd.argv
    with pytest.raises(ConfigError):
        server_command("mlflow.db; rm -rf /", tmp_path)
    with pytest.raises(ConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        os.environ.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
        server_command(f"sqlite:///{tmp_path}/m.db", tmp_path / "art", basic_auth=True)


def test_basic_auth_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "s3cret-pass")
    cmd = server_command(f"sqlite:///{tmp_path}/m.db", tmp_path / "art", basic_auth=True)
    assert cmd.argv[-2:] == ["--app-name", "basic-auth"]
    ini = Path(cmd.env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert f"sqlite:///{tmp_path}/basic_auth.db" in ini and "s3cret" not in ini


def test_serve_answers_health(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(
        f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", port=port, log_path=tmp_path / "log"
    )
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_monitor_flags_stalled_nonfinite_and_spiking_runs(
    mlflow_server: str, capsys: pytest.CaptureFixture
) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"monitor-{time.time_ns()}")
    now = int(time.time() * 1000)

    def run(losses: list[float], age_s: float) -> str:
        r = client.create_run(exp)
        ts = now - int(age_s * 1000)
        metrics = [Metric("train/loss", v, ts, i + 1) for i, v in enumerate(losses)]
        client.log_batch(r.info.run_id, metrics=metrics)
        return r.info.run_id

    stalled = run([3.0, 2.9, 2.8], age_s=3600)
    nonfinite = run([3.0, math.nan], age_s=0)
    spike = run([3.0, 2.9, 2.8, 2.7, 30.0], age_s=0)
    healthy = run([3.0, 2.9, 2.8], age_s=0)
    finished_old = run([3.0, 2.9], age_s=3600)
    client.set_terminated(finished_old, "FINISHED")

    exp_name = client.get_experiment(exp).name
    flagged = dict(monitor(mlflow_server, exp_name, stall_seconds=600))
    assert set(flagged) == {stalled, nonfinite, spike}
    assert flagged[stalled].startswith("stalled") and flagged[nonfinite].startswith("nonfinite")
    assert flagged[spike].startswith("spike")
    for run_id, health in ((stalled, "stalled"), (nonfinite, "nonfinite"), (spike, "spike")):
        tags = client.get_run(run_id).data.tags
        assert tags["health"] == health and tags["health_reason"]
    assert "health" not in client.get_run(healthy).data.tags

    code = run_cli(
        ["monitor", "--tracking-uri", mlflow_server, "--experiment", exp_name, "--stall-seconds", "600"]
    )
    assert code == 3 and stalled in capsys.readouterr().out
