"""The operators' MLflow tracking server: one command, bound to 127.0.0.1 unless told otherwise.

``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` keep it to two processes
(~480 MB) instead of ~10 (3 GB). Any SQLAlchemy URI works as the backend store
(``sqlite:///...``, ``postgresql://...``, ``mysql://...``); artifacts are served over HTTP from
``artifacts_destination``. With ``basic_auth`` the ``basic-auth`` app runs with its user store
next to the server (``auth_database_uri``) and the admin password from
``$MLFLOW_AUTH_ADMIN_PASSWORD``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import ConfigError

STORE_URI = re.compile(r"^[a-z][a-z0-9+]*://")


@dataclass
class ServerCommand:
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        host = self.argv[self.argv.index("--host") + 1]
        port = self.argv[self.argv.index("--port") + 1]
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    basic_auth: bool = False,
    auth_database_uri: str | None = None,
) -> ServerCommand:
    """The ``mlflow server`` argv and environment (validated; nothing is started)."""
    if not STORE_URI.match(backend_store_uri):
        raise ConfigError(
            f"backend store {backend_store_uri!r} is not a SQLAlchemy URI (e.g. sqlite:///mlflow.db)"
        )
    if not 0 < port < 65536 or workers < 1:
        raise ConfigError("--port must be in 1..65535 and --workers >= 1")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    argv = [mlflow_bin, "server", "--backend-store-uri", backend_store_uri]
    argv += ["--artifacts-destination", str(artifacts_destination)]
    argv += ["--host", host, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if basic_auth:
        if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise ConfigError("basic auth needs the admin password in $MLFLOW_AUTH_ADMIN_PASSWORD")
        if auth_database_uri is None:
            if not backend_store_uri.startswith("sqlite:///"):
                raise ConfigError("basic auth with a non-sqlite store needs --auth-database-uri")
            store = Path(backend_store_uri.removeprefix("sqlite:///"))
            auth_database_uri = f"sqlite:///{store.with_name('basic_auth.db')}"
        ini = Path(str(artifacts_destination)).parent / "basic_auth.ini"
        if "://" not in str(artifacts_destination):
            ini.parent.mkdir(parents=True, exist_ok=True)
            ini.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = {auth_database_uri}\nadmin_username = admin\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        argv += ["--app-name", "basic-auth"]
    return ServerCommand(argv, env)


def wait_healthy(url: str, *, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url/health`` until it answers; raises if the server exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


def serve(
    backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str | Path = "mlartifacts",
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    basic_auth: bool = False,
    auth_database_uri: str | None = None,
    log_path: Path | None = None,
    wait: bool = True,
) -> subprocess.Popen:
    """Start the server in its own session; with ``wait``, return once ``/health`` answers.

    Stop it with ``os.killpg(proc.pid, signal.SIGTERM)`` (it has worker children).
    """
    cmd = server_command(
        backend_store_uri,
        artifacts_destination,
        host=host,
        port=port,
        workers=workers,
        basic_auth=basic_auth,
        auth_database_uri=auth_database_uri,
    )
    out = log_path.open("ab") if log_path else None
    proc = subprocess.Popen(
        cmd.argv, env=cmd.env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
    )
    if out is not None:
        out.close()
    if wait:
        try:
            wait_healthy(cmd.url, proc=proc)
        except BaseException:
            proc.kill()
            raise
    return proc
