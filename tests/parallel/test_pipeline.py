"""Pipeline parallelism in the megatron engine (megatron-core's 1F1B schedule on CPU/gloo): the
pp=2 loss curve equals the single-process TrainModule's, eval and checkpoints are those of the
single-process layout, and the stage split / refusals are plain unit tests."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests.parallel.test_megatron_engine import (
    STEPS,
    _configs,
    _dp_slice,
    _max_rel,
    _reference,
    _step_batches,
)

TOL = 1e-5


def _engine(model_cfg, train_cfg, topo, *, steps=STEPS, state=None, start=0, virtual_stages=1):
    from parallel.config import ParallelConfig
    from parallel.engines.megatron import MegatronTrainModule

    torch.manual_seed(0)
    pcfg = ParallelConfig(tp=topo.tp, pp=topo.pp, cp=topo.cp, engine="megatron")
    module = MegatronTrainModule(
        model_cfg.build(), train_cfg, pcfg, topo, torch.device("cpu"), virtual_stages=virtual_stages
    )
    if state is not None:
        module.load_state_dict(state)
    curve = []
    for s in range(start, start + steps):
        out = module.train_step(_dp_slice(_step_batches(s, model_cfg.vocab_size), topo.dp_rank, topo.dp))
        curve.append((float(out["loss"]), float(out["grad_norm"])))
    return module, curve


def _pp2(rank: int, world_size: int) -> dict[str, float]:
    import torch.distributed as dist

    from parallel.topology import Topology

    model_cfg, train_cfg = _configs()
    topo = Topology(tp=1, pp=2, cp=1, world_size=world_size).build()
    ref_module, ref = _reference(model_cfg, train_cfg)
    assert any(gn > train_cfg.grad_clip for _, gn in ref), "clipping should be exercised"
    errors: dict[str, float] = {}
    module, curve = _engine(model_cfg, train_cfg, topo)
    errors["pp2"] = _max_rel(curve, ref)
    if not torch.cuda.is_available():  # the schedule ran on the CPU stand-ins of parallel.cpu_shims
        from megatron.core.pipeline_parallel import p2p_communication, schedules

        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert p2p_communication.torch.cuda.current_device() == torch.device("cpu")

    # interleaved 1F1B: 4 layers as 2 virtual stages of 1 layer on each of the 2 ranks
    deep = model_cfg.model_copy(update={"n_layers": 4})
    _, deep_ref = _reference(deep, train_cfg, steps=4)
    _, deep_curve = _engine(deep, train_cfg, topo, steps=4, virtual_stages=2)
    errors["pp2_vp2"] = _max_rel(deep_curve, deep_ref)

    # eval through the forward-only schedule: the single-process mean, on every stage
    batches = _step_batches(99, model_cfg.vocab_size)
    want = ref_module.eval_loss(batches)
    errors["eval"] = abs(module.eval_loss(batches) - want) / want

    # the full state after training equals the single-process one (model and Adam moments)
    state = module.state_dict()
    if rank == 0:
        ref_state = ref_module.state_dict()
        assert set(state["model"]) == set(ref_state["model"])
        errors["model_state"] = max(
            float((state["model"][k] - v).abs().max()) for k, v in ref_state["model"].items()
        )
        assert sorted(state["optimizer"]["state"]) == sorted(ref_state["optimizer"]["state"])
        errors["adam_state"] = max(
            float((state["optimizer"]["state"][i]["exp_avg_sq"] - e["exp_avg_sq"]).abs().max())
            for i, e in ref_state["optimizer"]["state"].items()
        )
        assert [g["params"] for g in state["optimizer"]["param_groups"]] == [
            g["params"] for g in ref_state["optimizer"]["param_groups"]
        ]
    else:
        assert state == {}

    # resharding: pp=2 after 5 steps -> one process continues, and one process -> pp=2
    half = STEPS // 2
    module, _ = _engine(model_cfg, train_cfg, topo, steps=half)
    box = [module.state_dict()]
    dist.broadcast_object_list(box, src=0)
    _, cont = _reference(model_cfg, train_cfg, steps=STEPS - half, state=box[0], start=half)
    errors["pp2_to_1"] = _max_rel(cont, ref[half:])
    ref_half, _ = _reference(model_cfg, train_cfg, steps=half)
    _, cont_pp = _engine(
        model_cfg, train_cfg, topo, steps=STEPS - half, state=ref_half.state_dict(), start=half
    )
    errors["1_to_pp2"] = _max_rel(cont_pp, ref[half:])
    topo.destroy()
    return errors


def test_pp2_1f1b_and_interleaved_loss_curves_eval_and_resharding() -> None:
    results = run_distributed(_pp2, 2)
    for errors in results:
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, errors
    assert {"pp2", "pp2_vp2", "eval", "model_state", "adam_state", "pp2_to_1", "1_to_pp2"} <= set(results[0])


def test_stage_layers_split_evenly() -> None:
    from parallel.pipeline import stage_layers

    assert [list(stage_layers(4, 2, r)) for r in range(2)] == [[0, 1], [2, 3]]
    # interleaved: rank r holds chunks r and r + pp
    assert [list(stage_layers(8, 2, 1, vp=2, vp_stage=v)) for v in range(2)] == [[2, 3], [6, 7]]
    assert list(stage_layers(6, 3, 2)) == [4, 5]
    with pytest.raises(ValueError, match=r"not divisible by parallel\.pp=3"):
        stage_layers(4, 3, 0)


def test_tied_embeddings_are_refused_with_pp() -> None:
    from parallel.pipeline import apply_pipeline_parallel

    model_cfg, _ = _configs()
    tied = model_cfg.model_copy(update={"tie_word_embeddings": True}).build()
    with pytest.raises(ValueError, match=r"tie_word_embeddings=false or parallel\.pp=1"):
        apply_pipeline_parallel(tied, None)  # type: ignore[arg-type]
