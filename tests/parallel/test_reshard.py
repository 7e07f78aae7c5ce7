"""Reshardable DeepSpeed checkpoints through the real command line: the optimizer state is saved
in the single-process (canonical) AdamW layout, so a checkpoint saved under ZeRO-3 at dp=2
resumes in one process, and a single-process checkpoint resumes under ZeRO-3 or ZeRO-1 at dp=2,
each continuing the uninterrupted single-process loss curve."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.parallel.test_engines_training import STEPS, _assert_same_curve, _train

SAVE_AT = 3  # checkpoint.interval in test_engines_training.BASE
# Two ranks of 2 samples each see the reference's global batch of 4.
ZERO = {"parallel.engine": "deepspeed", "train.micro_batch_size": 2}


def _resume_from(checkpoint: Path, run_dir: Path) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    return run_dir


@pytest.fixture(scope="module")
def reference_run(
    tiny_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("reshard_ref") / "run"
    return run_dir, _train(tiny_corpus, run_dir)


def test_zero3_dp2_checkpoint_resumes_in_one_process(
    tiny_corpus: dict[str, Path], tmp_path: Path, reference_run: tuple[Path, dict]
) -> None:
    _, reference = reference_run
    zero3_dir = tmp_path / "zero3"
    zero3 = _train(tiny_corpus, zero3_dir, nproc=2, **ZERO, **{"parallel.zero_stage": 3})
    _assert_same_curve(zero3, reference, range(1, STEPS + 1))

    saved = zero3_dir / "checkpoints" / f"step_{SAVE_AT:08d}"
    resumed = _train(tiny_corpus, _resume_from(saved, tmp_path / "native"))
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    _assert_same_curve(resumed, reference, range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.parametrize("stage", [3, 1])
def test_single_process_checkpoint_resumes_under_zero_dp2(
    tiny_corpus: dict[str, Path], tmp_path: Path, reference_run: tuple[Path, dict], stage: int
) -> None:
    ref_dir, reference = reference_run
    saved = ref_dir / "checkpoints" / f"step_{SAVE_AT:08d}"
    run_dir = _resume_from(saved, tmp_path / f"zero{stage}")
    resumed = _train(tiny_corpus, run_dir, nproc=2, **ZERO, **{"parallel.zero_stage": stage})
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    _assert_same_curve(resumed, reference, range(SAVE_AT + 1, STEPS + 1))
