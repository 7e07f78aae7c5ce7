"""Lego-MT localized training, data parallel under DeepSpeed ZeRO and tensor x data parallel
with megatron-core's parallel linears, against the single process.

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


def _config(
    data_dir, *, zero_stage: int | None = None, tp: int | None = None, checkpointing: str = "none"
) -> LegoRunConfig:
    data = _cfg(data_dir).to_dict()
    data["model"]["dropout"] = 0.0
    data["parallel"] = {"activation_checkpointing": checkpointing}
    if zero_stage is not None:
        data["parallel"].update(engine="deepspeed", zero_stage=zero_stage)
    if tp is not None:
        data["parallel"].update(engine="megatron", tp=tp)
    return LegoRunConfig.from_dict(data)


def _worker(rank: int, world: int, data_dir, run_dir, zero_stage: int, stop_after: int | None) -> dict:
    torch.set_num_threads(1)
    res = train(_config(data_dir, zero_stage=zero_stage), run_dir, stop_after=stop_after)
    return {"losses": res["losses"]}


def _tp_worker(
    rank: int, world: int, data_dir, run_dir, tp: int, checkpointing: str, stop_after: int | None
) -> dict:
    torch.set_num_threads(1)
    cfg = _config(data_dir, tp=tp, checkpointing=checkpointing)
    return {"losses": train(cfg, run_dir, stop_after=stop_after)["losses"]}


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


def _tp_blocks_worker(rank: int, world: int) -> dict:
    from parallel.tensor import gather_tensor
    from parallel.topology import Topology
    from pretrain.lego.tensor_parallel import apply_lego_tensor_parallel
    from pretrain.models.lego_mt.config import tiny

    torch.manual_seed(0)
    cfg = tiny(["en"], vocab_size=64)
    dense = cfg.build(resident=["en"])
    src, tgt = torch.randint(8, 64, (3, 7)), torch.randint(8, 64, (3, 6))
    flows = 7  # Dec + Enc + Mix: every part, self- and cross-attention
    dense(src, tgt[:, :-1], flows, "en", labels=tgt[:, 1:])["loss"].backward()
    topo = Topology(tp=2, pp=1, cp=1, world_size=world).build()
    model = cfg.build(resident=["en"])
    model.load_state_dict(dense.state_dict())
    apply_lego_tensor_parallel(model, topo)
    out = model(src, tgt[:, :-1], flows, "en", labels=tgt[:, 1:])
    out["loss"].backward()
    named = dict(model.named_parameters())
    grads = {n: gather_tensor(p.grad, p, topo, to_all=True) for n, p in named.items()}
    res = {
        "loss": float(out["loss"]) - float(dense(src, tgt[:, :-1], flows, "en", labels=tgt[:, 1:])["loss"]),
        "q_shape": tuple(named["main.layers.0.attn.q.weight"].shape),
        "up_shape": tuple(named["dec_branches.en.layers.0.ffn.up.weight"].shape),
        "grad_diff": max(float((grads[n] - p.grad).abs().max()) for n, p in dense.named_parameters()),
        "names": sorted(named) == sorted(n for n, _ in dense.named_parameters()),
    }
    topo.destroy()
    return res


def test_tensor_parallel_blocks_equal_the_dense_model():
    """Each of 2 ranks holds half of every attention/FFN block; the loss and the gathered
    gradients of every parameter equal the dense model's."""
    for res in run_distributed(_tp_blocks_worker, 2):
        assert res["q_shape"] == (16, 32) and res["up_shape"] == (32, 32)
        assert res["names"]
        assert abs(res["loss"]) < 1e-6
        assert res["grad_diff"] < 1e-6


def test_tensor_parallel_matches_single_process(single, synthetic_pairs, tmp_path):
    """tp=2 (heads and FFN columns split, selective recompute of the split FFN) gives the one-process
    losses and saves the one-process partitions."""
    ref_dir, ref = single
    results = run_distributed(_tp_worker, 2, synthetic_pairs, tmp_path, 2, "selective", None)
    for res in results:
        _assert_close_losses(res["losses"], ref)
    _assert_close_partitions(ref_dir, tmp_path)


def test_tensor_parallel_resumes_across_layouts(single, synthetic_pairs, tmp_path):
    """Killed mid-group on one process (last save at step 6, with the optimizer), resumed at
    tp=2 x dp=2 on 4 processes: the optimizer moments are sharded on load, gathered on save."""
    ref_dir, ref = single
    first = train(_config(synthetic_pairs), tmp_path, stop_after=7)["losses"]
    second = run_distributed(_tp_worker, 4, synthetic_pairs, tmp_path, 2, "none", None)[0]["losses"]
    assert min(second) == 7
    _assert_close_losses({**first, **second}, ref)
    _assert_close_partitions(ref_dir, tmp_path)


def test_layouts_lego_cannot_run_are_refused(synthetic_pairs, tmp_path):
    from pretrain.config import ConfigError
    from pretrain.lego.tensor_parallel import check_tensor_parallel_shape

    data = _config(synthetic_pairs).to_dict()
    for parallel, words in (
        ({"pp": 2, "engine": "megatron"}, "set parallel.pp=cp=1"),
        ({"tp": 2}, "set parallel.engine=megatron for tensor parallelism"),
        ({"tp": 2, "engine": "deepspeed"}, "use parallel.engine=megatron for tp > 1"),
        ({"tp": 2, "engine": "megatron"}, "world size 1 is not divisible by parallel.tp=2"),
        ({"engine": "megatron", "zero_stage": 1}, "does not run ZeRO"),
        ({"zero_stage": 2}, "parallel.engine=deepspeed for data parallelism and ZeRO"),
    ):
        data["parallel"] = parallel
        with pytest.raises(ConfigError, match=words):
            train(LegoRunConfig.from_dict(data), tmp_path)
    data["parallel"] = {"engine": "megatron"}
    data["train"]["precision"] = "bf16"
    with pytest.raises(ConfigError, match="runs fp32 only"):
        train(LegoRunConfig.from_dict(data), tmp_path)
    with pytest.raises(ConfigError, match=r"model\.n_heads=4 is not divisible by parallel\.tp=3"):
        check_tensor_parallel_shape(_cfg(synthetic_pairs).model, 3)


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
