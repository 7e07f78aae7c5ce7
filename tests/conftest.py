"""Shared fixtures: a small real tokenized corpus, tiny run configs, a real MLflow server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Python stdlib text -> SentencePiece (512 pieces) -> Megatron shards; built once per session."""
    from data_pipeline.corpus import build_stdlib_corpus
    from data_pipeline.tokenize import tokenize_to_megatron
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    raw = root / "raw.jsonl"
    build_stdlib_corpus(raw, max_bytes=400_000)
    model = train_tokenizer([raw], root / "tok", vocab_size=512)
    tokenize_to_megatron([raw], model, root / "corpus")
    return {"prefix": root / "corpus", "tokenizer": model, "raw": raw}


def tiny_overrides(corpus: dict[str, Path], run_dir: Path, **extra: object) -> list[str]:
    """``--set`` overrides for a run that takes seconds: d=32, 2 layers, 64-token samples."""
    sets = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "data.paths": f"[{corpus['prefix']}]",
        "data.tokenizer": str(corpus["tokenizer"]),
        "data.seq_len": 64,
        "model.vocab_size": 512,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.glu_dim": 64,
        "model.attention_block_size": 16,
        "train.steps": 12,
        "train.micro_batch_size": 4,
        "train.warmup_steps": 2,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.eval_batches": 2,
        "train.threads": 1,
        "checkpoint.interval": 4,
        "tracking.enabled": False,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def tiny_config(corpus: dict[str, Path], run_dir: Path, **extra: object):
    from configs import preset_path
    from pretrain.run_config import RunConfig

    return RunConfig.from_yaml(preset_path("tnl-tiny"), tiny_overrides(corpus, run_dir, **extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite store, artifacts served over HTTP)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = shutil.which("mlflow", path=str(BIN)) or "mlflow"
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not become healthy in 90 s")
    yield uri
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """The local single-node cluster (``cluster.local_slurm``); ``SLURM_CONF`` is exported."""
    from cluster.local_slurm import LocalSlurmError, start

    try:
        cluster = start()
    except LocalSlurmError as exc:
        pytest.fail(f"the local SLURM cluster could not start: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster.conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
