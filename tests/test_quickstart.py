"""The main job end to end, through the command line: stdlib text to a trained TNL with
checkpoints, MLflow run, held-out perplexity and a sample; a re-run reuses every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from checkpoints import Checkpointer, verify_checkpoint

STAGES = ["corpus", "clean", "tokenizer", "tokenize"]
# Fewer steps than the real quickstart keep the test short; the loss must still fall clearly.
SETS = ["train.steps=60", "train.eval_interval=0", "train.log_interval=10", "checkpoint.interval=30"]


def _quickstart(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pretrain.cli", "quickstart", "--out", str(out), "--no-progress"]
    for s in SETS:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_quickstart_end_to_end_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    first = _quickstart(out)
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "mlflow_tracking_uri",
        "mlflow_run_id",
        "checkpoint_dir",
        "initial_loss",
        "final_loss",
        "heldout_perplexity",
        "tokens_per_second",
    ):
        assert summary[key] is not None, key
    assert summary["final_loss"] < summary["initial_loss"] - 1.0
    assert 1 < summary["heldout_perplexity"] < 4096  # better than uniform over the vocabulary
    assert summary["tokens_per_second"] > 0
    assert summary["corpus"]["tokens"]["tokens"] > 1_000_000
    assert summary["sample"]["completion"]
    assert "mlflow ui --backend-store-uri" in first.stdout

    steps = [s for s, _ in Checkpointer(Path(summary["checkpoint_dir"])).list()]
    assert steps == [30, 60]
    verify_checkpoint(Path(summary["checkpoint"]))
    run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"

    records = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES}
    second = _quickstart(out)
    assert all(f"stage {s}" in second.stderr and "reused" in second.stderr for s in STAGES)
    assert records == {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES}
    again = json.loads((out / "summary.json").read_text())
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert again["final_loss"] == summary["final_loss"]
    assert again["heldout_perplexity"] == summary["heldout_perplexity"]
    assert again["sample"] == summary["sample"]
