"""DeepSpeed ZeRO: config building (no process group) and exactness against the single-process
TrainModule on 2 gloo processes (fp32, tiny TransNormerLLM).

One spawn runs every distributed check (DeepSpeed's engine init costs ~5-10 s per engine here):
ZeRO-0/1/2/3 at dp=2 each train 10 steps on the halves of the same global batches as the
reference; one step's gradients are gathered and compared tensor by tensor; ZeRO-0/1/2 rewind to
a saved state and repeat their last steps; ZeRO-3 saves through our Checkpointer and a fresh engine
resumes from it; its consolidated weights give a plain model the engine's logits. Every stage's
saved optimizer state is the single-process AdamW ``state_dict`` (layout and values). A bf16 ZeRO-2
run checks that checkpoints hold the fp32 masters, not the bf16 weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from parallel.config import ParallelConfig
from parallel.zero import build_deepspeed_config
from pretrain.data.loader import Batch
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import TrainModule, token_loss
from tests._dist import run_distributed

STEPS, ACCUM, MBS, SEQ, VOCAB, DP = 10, 2, 2, 16, 64, 2
SAVE_AT = 5  # ZeRO-3 saves after this many steps; the resumed engine runs the rest
ZERO3_OVERRIDES = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # partition every param


def _train_config() -> TrainConfig:
    return TrainConfig(
        steps=STEPS,
        micro_batch_size=MBS,
        grad_accum=ACCUM,
        warmup_steps=2,
        lr=1e-2,
        grad_clip=1.0,
        precision="fp32",
        device="cpu",
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, glu_dim=48)
    return cfg.build()


def _global_batches() -> list[list[Batch]]:
    """STEPS steps of ACCUM global micro-batches of DP*MBS samples; ragged masks so the ranks
    hold different token counts (the normalisation must be global)."""
    gen = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(STEPS):
        mbs = []
        for _ in range(ACCUM):
            tokens = torch.randint(0, VOCAB, (DP * MBS, SEQ + 1), generator=gen)
            mask = (torch.rand(DP * MBS, SEQ, generator=gen) > 0.3).float()
            mask[0, : SEQ // 2] = 0.0  # rank 0 sees fewer tokens
            mbs.append(Batch(tokens[:, :-1], tokens[:, 1:], mask))
        steps.append(mbs)
    return steps


def _shard(mb: Batch, rank: int) -> Batch:
    rows = slice(rank * MBS, (rank + 1) * MBS)
    return Batch(mb.tokens[rows], mb.labels[rows], mb.loss_mask[rows])


def _reference() -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict]:
    """Single-process losses/grad norms/lrs, the first step's gradients and the AdamW state
    after ``SAVE_AT`` steps."""
    batches = _global_batches()
    model = _model()
    n = sum(mb.loss_mask.sum() for mb in batches[0])
    for mb in batches[0]:
        (token_loss(model(mb.tokens), mb.labels, mb.loss_mask) / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    module = TrainModule(_model(), _train_config(), torch.device("cpu"))
    curve, optimizer_state = [], None
    for i, mbs in enumerate(batches):
        curve.append({k: float(v) for k, v in module.train_step(mbs).items()})
        if i + 1 == SAVE_AT:
            optimizer_state = copy.deepcopy(module.optimizer.state_dict())  # AdamW steps in place
    return curve, grads, optimizer_state


# -- distributed body ---------------------------------------------------------------------------


def _engine(stage: int, precision: str = "fp32"):
    from parallel.engines.deepspeed import DeepSpeedTrainModule

    parallel = ParallelConfig(zero_stage=stage, engine="deepspeed")
    overrides = ZERO3_OVERRIDES if stage == 3 else None
    train = _train_config().model_copy(update={"precision": precision})
    return DeepSpeedTrainModule(_model(), train, parallel, torch.device("cpu"), ds_overrides=overrides)


def _capture_first_grads(module, out: dict[str, torch.Tensor]) -> None:
    """Wrap ``engine.step`` so the gathered gradients are read at the first update boundary."""
    from deepspeed.utils import safe_get_full_grad

    engine, real_step = module.engine, module.engine.step

    def step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary() and not out:
            for name, p in module.model.named_parameters():
                out[name] = safe_get_full_grad(p).detach().clone()
        return real_step(*args, **kwargs)

    engine.step = step


def _run(module, batches: list[list[Batch]], rank: int) -> list[dict[str, float]]:
    out = []
    for mbs in batches:
        result = module.train_step([_shard(mb, rank) for mb in mbs])
        out.append({k: float(v) for k, v in result.items()})
    return out


def _zero_checks(rank: int, world_size: int, ckpt_root: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from checkpoints import Checkpointer, flatten_state, load_checkpoint, unflatten_state

    deepspeed.utils.logger.setLevel("WARNING")
    batches = _global_batches()
    results: dict = {}
    for stage in (0, 1, 2, 3):
        module = _engine(stage)
        grads: dict[str, torch.Tensor] = {}
        _capture_first_grads(module, grads)
        curve = _run(module, batches[:SAVE_AT], rank)
        state = module.state_dict()
        if stage == 3:
            if rank == 0:
                Checkpointer(Path(ckpt_root)).save(SAVE_AT, state)
            dist.barrier()
        curve += _run(module, batches[SAVE_AT:], rank)
        entry = {"curve": curve, "grads": grads if rank == 0 else None}
        entry["optimizer"] = _numpy(state["optimizer"]) if rank == 0 else None  # a copy, before resuming
        if stage == 1:  # a state of the wrong shapes is refused before anything is loaded
            bad = {
                **state["optimizer"],
                "state": {k: dict(v) for k, v in state["optimizer"]["state"].items()},
            }
            bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"][:1]
            try:
                module.load_state_dict({**state, "optimizer": bad})
            except ValueError as exc:
                entry["bad_shape_error"] = str(exc)
        if stage < 3:  # rewind this engine through the checkpoint encoding and repeat
            tensors, skeleton = flatten_state(state)
            module.load_state_dict(unflatten_state(tensors, skeleton))
            entry["rewound"] = _run(module, batches[SAVE_AT:], rank)
        else:  # a fresh engine resumes from the saved checkpoint
            loaded = load_checkpoint(Checkpointer(Path(ckpt_root)).latest())
            resumed = _engine(3)
            resumed.load_state_dict(loaded.state)
            entry["resumed"] = _run(resumed, batches[SAVE_AT:], rank)
            probe = batches[0][0].tokens
            with torch.no_grad():
                resumed.engine.eval()
                entry["engine_logits"] = resumed.engine(probe).detach().clone()
            final = resumed.state_dict()["model"]  # a collective: every rank calls it
            entry["final_weights"] = final if rank == 0 else None
            entry["saved_weights"] = loaded.state["model"] if rank == 0 else None
        results[stage] = entry
    # bf16 (ZeRO-2): bf16 weights against fp32 masters; the checkpoint holds the masters
    module = _engine(2, precision="bf16")
    curve = _run(module, batches[:3], rank)
    state = module.state_dict()
    tensors, skeleton = flatten_state(state)
    curve += _run(module, batches[3:5], rank)
    module.load_state_dict(unflatten_state(tensors, skeleton))
    results["bf16"] = {
        "curve": curve,
        "rewound": _run(module, batches[3:5], rank),
        "weights": state["model"] if rank == 0 else None,
        "param_dtype": str(next(module.model.parameters()).dtype),
    }
    return _numpy(results)


def _numpy(obj):
    """Results cross the process boundary as numpy: a torch tensor is sent as a shared-memory
    handle that is gone once the worker exits."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy(v) for v in obj]
    return obj


# -- tests --------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zero_ckpt")
    per_rank = run_distributed(_zero_checks, DP, str(root), timeout=400)
    ref_curve, ref_grads, ref_optimizer = _reference()
    return {"ranks": per_rank, "ref_curve": ref_curve, "ref_grads": ref_grads, "ref_optimizer": ref_optimizer}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_loss_curve_matches_single_process(zero_results: dict, stage: int) -> None:
    ref = zero_results["ref_curve"]
    for rank_results in zero_results["ranks"]:
        curve = rank_results[stage]["curve"]
        assert len(curve) == STEPS
        for step, (got, want) in enumerate(zip(curve, ref)):
            assert _rel(got["loss"], want["loss"]) < 1e-5, (stage, step, got, want)
            assert _rel(got["grad_norm"], want["grad_norm"]) < 1e-4, (stage, step, got, want)
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-7)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gathered_gradients_match(zero_results: dict, stage: int) -> None:
    grads = zero_results["ranks"][0][stage]["grads"]
    ref = zero_results["ref_grads"]
    assert grads.keys() == ref.keys()
    for name, want in ref.items():
        torch.testing.assert_close(
            torch.from_numpy(grads[name]), want, rtol=1e-5, atol=1e-7, msg=f"ZeRO-{stage} {name}"
        )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_optimizer_state_is_the_single_process_adamw_layout(zero_results: dict, stage: int) -> None:
    got, want = zero_results["ranks"][0][stage]["optimizer"], zero_results["ref_optimizer"]
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]
    for g_got, g_want in zip(got["param_groups"], want["param_groups"]):
        assert g_got["lr"] == pytest.approx(g_want["lr"], rel=1e-7)
        assert g_got["weight_decay"] == g_want["weight_decay"] and tuple(g_got["betas"]) == tuple(
            g_want["betas"]
        )
    assert sorted(got["state"]) == sorted(want["state"])
    for i, entry in want["state"].items():
        assert float(got["state"][i]["step"]) == float(entry["step"]) == SAVE_AT
        for key in ("exp_avg", "exp_avg_sq"):
            value, ref = torch.as_tensor(got["state"][i][key]), entry[key]
            assert value.shape == ref.shape, (stage, i, key)
            torch.testing.assert_close(value, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_optimizer_state_of_wrong_shape_is_refused(zero_results: dict) -> None:
    assert "has shape (1, 32), the model's is (64, 32)" in zero_results["ranks"][0][1]["bad_shape_error"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_rewind_repeats_steps_exactly(zero_results: dict, stage: int) -> None:
    for rank_results in zero_results["ranks"]:
        entry = rank_results[stage]
        assert entry["rewound"] == entry["curve"][SAVE_AT:]


def test_zero3_resume_from_checkpoint_is_bit_identical(zero_results: dict) -> None:
    for rank_results in zero_results["ranks"]:
        entry = rank_results[3]
        assert entry["resumed"] == entry["curve"][SAVE_AT:]


def test_zero3_consolidated_weights_load_into_plain_model(zero_results: dict) -> None:
    entry = zero_results["ranks"][0][3]
    weights = entry["final_weights"]
    model = _model()
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items()}
    )  # strict: every key, full single-process shapes
    probe = _global_batches()[0][0].tokens
    with torch.no_grad():
        logits = model.eval()(probe)
    torch.testing.assert_close(logits, torch.from_numpy(entry["engine_logits"]), rtol=0, atol=0)
    # and the checkpoint saved mid-run held full fp32 weights too
    assert all(entry["saved_weights"][k].shape == v.shape for k, v in weights.items())


def test_bf16_trains_close_to_fp32_and_saves_fp32_masters(zero_results: dict) -> None:
    ref = zero_results["ref_curve"]
    for rank_results in zero_results["ranks"]:
        entry = rank_results["bf16"]
        assert entry["param_dtype"] == "torch.bfloat16"
        for got, want in zip(entry["curve"], ref):
            assert _rel(got["loss"], want["loss"]) < 2e-2
        assert entry["rewound"] == entry["curve"][3:]
    weights = zero_results["ranks"][0]["bf16"]["weights"]
    for name, w in weights.items():
        w = torch.from_numpy(w)
        assert w.dtype == torch.float32
        if "weight" in name:  # masters moved off the bf16 grid after 3 AdamW steps
            assert not torch.equal(w, w.bfloat16().float()), name


# -- config building (no process group) ---------------------------------------------------------


def _cfg(stage: int = 1, offload: bool = False, precision: str = "fp32", **kw) -> dict:
    train = _train_config().model_copy(update={"precision": precision})
    return build_deepspeed_config(
        train,
        ParallelConfig(zero_stage=stage, offload=offload, engine="deepspeed"),
        dp_size=kw.pop("dp_size", 4),
        micro_batch_size=kw.pop("micro_batch_size", 3),
        grad_accum=kw.pop("grad_accum", 5),
        device=torch.device("cpu"),
        **kw,
    )


def test_config_batch_sizes_precision_and_optimizer() -> None:
    cfg = _cfg(stage=2)
    assert cfg["train_batch_size"] == 3 * 5 * 4
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["gradient_clipping"] == 1.0
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params["betas"] == [0.9, 0.95] and params["weight_decay"] == 0.1 and params["lr"] == 1e-2
    assert "scheduler" not in cfg
    assert _cfg(precision="bf16")["bf16"]["enabled"] is True
    assert _cfg(precision="auto")["bf16"]["enabled"] is False  # auto on CPU is fp32


def test_config_offload_uses_cpu_adam_and_offloads_params_at_stage3() -> None:
    two, three = _cfg(stage=2, offload=True), _cfg(stage=3, offload=True)
    assert "torch_adam" not in two["optimizer"]["params"]
    assert two["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in two["zero_optimization"]
    assert three["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="zero_stage"):
        _cfg(stage=0, offload=True)


def test_config_overrides_merge_and_sizes_are_checked() -> None:
    cfg = _cfg(stage=3, overrides=ZERO3_OVERRIDES)
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    with pytest.raises(ValueError, match="grad_accum"):
        _cfg(grad_accum=0)
