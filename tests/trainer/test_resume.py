"""Re-running the same command resumes from the latest checkpoint, and the resumed run is
bit-identical to an uninterrupted one: per-step losses, gradient norms and final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoints import Checkpointer
from configs import preset_path
from pretrain.trainer.callbacks.metrics_file import read_metrics
from tests.conftest import tiny_overrides

STEPS = 40
# Larger than the other tiny runs so that a step takes long enough to kill the run mid-way.
SIZE = {
    "model.d_model": 64,
    "model.glu_dim": 128,
    "data.seq_len": 128,
    "train.micro_batch_size": 8,
    "train.steps": STEPS,
    "checkpoint.interval": 5,
    "checkpoint.keep_last": 2,
}


def _train_cmd(corpus: dict[str, Path], run_dir: Path) -> list[str]:
    sets = tiny_overrides(corpus, run_dir, **SIZE)
    return [
        sys.executable,
        "-m",
        "pretrain.cli",
        "train",
        str(preset_path("tnl-tiny")),
        "--no-progress",
        *(x for s in sets for x in ("--set", s)),
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = Checkpointer(run_dir / "checkpoints").latest()
    assert latest is not None and latest.name == f"step_{STEPS:08d}"
    return load_file(latest / "model.safetensors")


def test_sigkill_then_rerun_is_bit_identical(tiny_corpus: dict[str, Path], tmp_path: Path) -> None:
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    _run(_train_cmd(tiny_corpus, ref_dir))

    # Start the same run and SIGKILL it once it is past its second checkpoint.
    proc = subprocess.Popen(
        _train_cmd(tiny_corpus, killed_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_at_kill = [s for s, _ in Checkpointer(killed_dir / "checkpoints").list()]
    assert steps_at_kill and max(steps_at_kill) < STEPS, steps_at_kill

    out = _run(_train_cmd(tiny_corpus, killed_dir))
    results = json.loads(out.stdout)
    assert 0 < results["resumed_from_step"] < STEPS

    ref, resumed = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(metrics)
    assert sorted(ref) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in ref:
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert resumed[step][key] == ref[step][key], (step, key)
    ref_w, res_w = _final_weights(ref_dir), _final_weights(killed_dir)
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], res_w[name]), name
    # The loss clearly fell, or the comparison above would be vacuous.
    assert ref[STEPS]["train/loss"] < ref[1]["train/loss"] - 0.5


def test_rerun_of_finished_run_trains_nothing(tiny_corpus: dict[str, Path], tmp_path: Path) -> None:
    from pretrain.train import run_training
    from tests.conftest import tiny_config

    config = tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 4, "checkpoint.interval": 2})
    first = run_training(config, progress=False)
    second = run_training(config, progress=False)
    assert second["resumed_from_step"] == 4
    assert second["final_loss"] == first["final_loss"]
    assert second["heldout_loss"] == first["heldout_loss"]
    assert [s for s, _ in Checkpointer(tmp_path / "run" / "checkpoints").list()] == [2, 4]
