"""Lego-MT localized training, data parallel under DeepSpeed ZeRO, against the single process.

Dropout is off (its masks depend on how the batch is split); layerdrop stays on, since every rank
draws the same layer decisions from the step's seed. The checkpoints are in one layout, so a run
stopped under one engine/ZeRO stage/process count resumes under another with the same losses.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.lego.train import LegoRunConfig, train
from tests._dist import run_distributed
from tests.lego.test_train import _cfg, _partitions

REL = 1e-5


def _config(data_dir, *, zero_stage: int | None = None, checkpointing: str = "none") -> LegoRunConfig:
    data = _cfg(data_dir).to_dict()
    data["model"]["dropout"] = 0.0
    data["parallel"] = {"activation_checkpointing": checkpointing}
    if zero_stage is not None:
        data["parallel"].update(engine="deepspeed", zero_stage=zero_stage)
    return LegoRunConfig.from_dict(data)


def _worker(rank: int, world: int, data_dir, run_dir, zero_stage: int, stop_after: int | None) -> dict:
    torch.set_num_threads(1)
    res = train(_config(data_dir, zero_stage=zero_stage), run_dir, stop_after=stop_after)
    return {"losses": res["losses"]}


@pytest.fixture(scope="module")
def single(synthetic_pairs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    return run_dir, train(_config(synthetic_pairs), run_dir)["losses"]


def _assert_close_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref)
    for step, value in ref.items():
        assert abs(got[step] - value) <= REL * abs(value), (step, got[step], value)


def _assert_close_partitions(a_dir, b_dir) -> None:
    """Weights agree to 2e-4 (1% of the init std): AdamW's ``m / sqrt(v)`` turns rounding noise on
    near-zero gradient entries into sign flips of up to ``lr`` per step; the losses agree to 1e-5."""
    a, b = _partitions(a_dir), _partitions(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        for part, tensors in a[name].items():
            for key, value in tensors.items():
                torch.testing.assert_close(
                    b[name][part][key], value, rtol=1e-4, atol=2e-4, msg=(name, part, key)
                )


@pytest.mark.parametrize("zero_stage", [0, 2, 3])  # ZeRO-1 shares ZeRO-2's optimizer
def test_dp2_zero_matches_single_process(zero_stage, single, synthetic_pairs, tmp_path):
    ref_dir, ref = single
    results = run_distributed(_worker, 2, synthetic_pairs, tmp_path, zero_stage, None)
    for res in results:  # every rank reports the global loss
        _assert_close_losses(res["losses"], ref)
    _assert_close_partitions(ref_dir, tmp_path)


def test_resume_across_engines_and_process_counts(single, synthetic_pairs, tmp_path):
    """Killed mid-group under ZeRO-2 on 2 processes (last save at step 6, with the optimizer),
    resumed on 1 process; then the other way round: killed on 1 process, resumed under ZeRO-3."""
    ref_dir, ref = single
    first = run_distributed(_worker, 2, synthetic_pairs, tmp_path / "a", 2, 7)[0]["losses"]
    second = train(_config(synthetic_pairs), tmp_path / "a")["losses"]
    assert min(second) == 7
    _assert_close_losses({**first, **second}, ref)
    _assert_close_partitions(ref_dir, tmp_path / "a")

    first = train(_config(synthetic_pairs), tmp_path / "b", stop_after=7)["losses"]
    second = run_distributed(_worker, 2, synthetic_pairs, tmp_path / "b", 3, None)[0]["losses"]
    assert min(second) == 7
    _assert_close_losses({**first, **second}, ref)
    _assert_close_partitions(ref_dir, tmp_path / "b")


def test_activation_checkpointing_keeps_the_curve(single, synthetic_pairs, tmp_path):
    _, ref = single
    for mode in ("full", "selective"):
        losses = train(_config(synthetic_pairs, checkpointing=mode), tmp_path / mode)["losses"]
        _assert_close_losses(losses, ref)


def test_layouts_lego_cannot_run_are_refused(synthetic_pairs, tmp_path):
    from pretrain.config import ConfigError

    data = _config(synthetic_pairs).to_dict()
    for parallel, words in (
        ({"tp": 2, "engine": "megatron"}, "data parallel only"),
        ({"engine": "megatron"}, "does not run Lego-MT"),
        ({"zero_stage": 2}, "set parallel.engine=deepspeed"),
    ):
        data["parallel"] = parallel
        with pytest.raises(ConfigError, match=words):
            train(LegoRunConfig.from_dict(data), tmp_path)


def test_bf16_follows_the_fp32_curve(single, synthetic_pairs, tmp_path):
    """bf16 (autocast on one process; bf16 weights on fp32 masters under ZeRO-2 at dp=2) keeps
    the fp32 losses to 2% at every step and saves fp32 partitions."""
    _, ref = single

    def check(losses: dict[int, float]) -> None:
        assert sorted(losses) == sorted(ref)
        for step, value in ref.items():
            assert abs(losses[step] - value) <= 0.02 * value, (step, losses[step], value)

    data = _config(synthetic_pairs).to_dict()
    data["train"]["precision"] = "bf16"
    check(train(LegoRunConfig.from_dict(data), tmp_path / "local")["losses"])
    check(run_distributed(_bf16_worker, 2, synthetic_pairs, tmp_path / "dp")[0]["losses"])
    for tensors in _partitions(tmp_path / "dp")["shared"].values():
        assert all(v.dtype == torch.float32 for v in tensors.values())


def _bf16_worker(rank: int, world: int, data_dir, run_dir) -> dict:
    torch.set_num_threads(1)
    data = _config(data_dir, zero_stage=2).to_dict()
    data["train"]["precision"] = "bf16"
    return {"losses": train(LegoRunConfig.from_dict(data), run_dir)["losses"]}


def test_cli_starts_data_parallel_ranks(single, synthetic_pairs, tmp_path):
    """`pretrain lego-mt train --nproc-per-node 2` under ZeRO-1 ends with the single-process weights."""
    import subprocess
    import sys

    import yaml

    ref_dir, _ = single
    config = tmp_path / "lego.yaml"
    config.write_text(yaml.safe_dump(_config(synthetic_pairs, zero_stage=1).to_dict()))
    cmd = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "lego-mt",
        "train",
        str(config),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run([*cmd, "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 21 steps") == 1  # rank 0 reports
    _assert_close_partitions(ref_dir, tmp_path / "run")
