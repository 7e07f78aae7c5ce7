"""The engines through the real command line: ``pretrain train --nproc-per-node 2`` with the
megatron engine (tp=2) and DeepSpeed (ZeRO-2, dp=2) gives the single-process loss curve, and a
checkpoint saved at tp=2 resumes in a single process with the same curve (resharding)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import verify_checkpoint
from configs import preset_path
from pretrain.trainer.callbacks.metrics_file import read_metrics
from tests.conftest import tiny_overrides

STEPS = 6
BASE = {"train.steps": STEPS, "checkpoint.interval": 3, "checkpoint.keep_last": 5, "model.n_heads": 2}


def _train(
    corpus: dict[str, Path], run_dir: Path, nproc: int = 1, **sets: object
) -> dict[int, dict[str, float]]:
    overrides = tiny_overrides(corpus, run_dir, **{**BASE, **sets})
    cmd = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "train",
        str(preset_path("tnl-tiny")),
        "--no-progress",
        "--nproc-per-node",
        str(nproc),
    ]
    cmd += [x for s in overrides for x in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return read_metrics(run_dir / "metrics.jsonl")


def _assert_same_curve(a: dict, b: dict, steps: range) -> None:
    for step in steps:
        for key in ("train/loss", "train/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (step, key)


@pytest.fixture(scope="module")
def reference(tiny_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _train(tiny_corpus, tmp_path_factory.mktemp("ref") / "run")


def test_megatron_tp2_matches_single_process_and_reshards(
    tiny_corpus: dict[str, Path], tmp_path: Path, reference: dict
) -> None:
    tp_dir = tmp_path / "tp2"
    tp = _train(tiny_corpus, tp_dir, nproc=2, **{"parallel.engine": "megatron", "parallel.tp": 2})
    _assert_same_curve(tp, reference, range(1, STEPS + 1))
    manifest = verify_checkpoint(tp_dir / "checkpoints" / "step_00000003")
    layout = manifest["metadata"]["layout"]
    assert (layout["engine"], layout["tp"], layout["dp"], layout["world_size"]) == ("megatron", 2, 1, 2)

    # Resume the tp=2 checkpoint of step 3 in one process: the rest of the curve is the same.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tp_dir / "checkpoints" / "step_00000003", resumed_dir / "checkpoints" / "step_00000003")
    resumed = _train(tiny_corpus, resumed_dir)
    assert sorted(resumed) == list(range(4, STEPS + 1))
    _assert_same_curve(resumed, reference, range(4, STEPS + 1))


def test_deepspeed_zero2_dp2_matches_single_process(
    tiny_corpus: dict[str, Path], tmp_path: Path, reference: dict
) -> None:
    # Two ranks of 2 samples each see the reference's global batch of 4.
    ds = _train(
        tiny_corpus,
        tmp_path / "zero2",
        nproc=2,
        **{"parallel.engine": "deepspeed", "parallel.zero_stage": 2, "train.micro_batch_size": 2},
    )
    _assert_same_curve(ds, reference, range(1, STEPS + 1))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"parallel.tp": 2, "parallel.engine": "megatron"}, "world size 1 is not divisible by tp*pp*cp = 2"),
        ({"parallel.zero_stage": 2}, "parallel.engine=deepspeed"),
        ({"parallel.engine": "megatron", "parallel.zero_stage": 1}, "use parallel.engine=deepspeed"),
        ({"parallel.sequence_parallel": True}, "sequence_parallel needs parallel.engine=megatron"),
    ],
)
def test_impossible_layout_fails_before_work(
    tiny_corpus: dict[str, Path], tmp_path: Path, sets: dict, message: str
) -> None:
    overrides = tiny_overrides(tiny_corpus, tmp_path / "run", **sets)
    cmd = [sys.executable, "-m", "pretrain.cli", "train", str(preset_path("tnl-tiny"))]
    cmd += [x for s in overrides for x in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_megatron_tp2_pp2_matches_single_process_and_resumes_in_one(
    tiny_corpus: dict[str, Path], tmp_path: Path
) -> None:
    # grad_accum=2: the two micro-batches of a step are the 1F1B schedule's micro-batches.
    accum = {"train.grad_accum": 2}
    reference = _train(tiny_corpus, tmp_path / "ref", **accum)
    run_dir = tmp_path / "tp2pp2"
    layout = {"parallel.engine": "megatron", "parallel.tp": 2, "parallel.pp": 2}
    got = _train(tiny_corpus, run_dir, nproc=4, **accum, **layout)
    _assert_same_curve(got, reference, range(1, STEPS + 1))

    # The tp=2 x pp=2 checkpoint of step 3 holds the full layout: one process resumes it.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", resumed_dir / "checkpoints" / "step_00000003")
    resumed = _train(tiny_corpus, resumed_dir, **accum)
    assert sorted(resumed) == list(range(4, STEPS + 1))
    _assert_same_curve(resumed, reference, range(4, STEPS + 1))

    # ... and so does ZeRO-3 at dp=4 (one sample per rank and micro-batch: the same global batch).
    zero_dir = tmp_path / "zero3dp4"
    (zero_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", zero_dir / "checkpoints" / "step_00000003")
    zero = _train(
        tiny_corpus,
        zero_dir,
        nproc=4,
        **accum,
        **{"parallel.engine": "deepspeed", "parallel.zero_stage": 3, "train.micro_batch_size": 1},
    )
    assert sorted(zero) == list(range(4, STEPS + 1))
    _assert_same_curve(zero, reference, range(4, STEPS + 1))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            {"parallel.pp": 2, "parallel.engine": "deepspeed"},
            "pipeline parallelism runs in the megatron engine only",
        ),
        ({"parallel.cp": 2}, "LASP context parallelism runs in the megatron engine only"),
        ({"parallel.engine": "megatron", "parallel.tp": 2, "parallel.cp": 2}, "LASP is not implemented"),
        (
            {"parallel.engine": "megatron", "parallel.pp": 2, "parallel.microbatches": 4},
            "set train.grad_accum",
        ),
    ],
)
def test_pipeline_and_context_layouts_refused_outside_megatron(sets: dict, message: str) -> None:
    from parallel.apply import check_layout
    from parallel.config import ParallelConfig
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_layout(ParallelConfig(**_fields(sets)), world_size=4)


def _fields(sets: dict) -> dict:
    return {k.removeprefix("parallel."): v for k, v in sets.items()}
