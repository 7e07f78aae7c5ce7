"""Context parallelism (LASP) in the megatron engine: at cp=2 each rank trains on its half of every
sequence and the loss curve, eval loss and full state equal the single-process TrainModule's."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests.parallel.test_megatron_engine import _configs, _max_rel, _reference, _step_batches
from tests.parallel.test_pipeline import _engine

TOL = 1e-5


def _cp2(rank: int, world_size: int) -> dict[str, float]:
    from parallel.topology import Topology

    model_cfg, train_cfg = _configs()
    topo = Topology(tp=1, pp=1, cp=2, world_size=world_size).build()
    assert topo.dp == 1 and topo.dp_rank == 0  # both cp ranks read the same batches
    ref_module, ref = _reference(model_cfg, train_cfg)
    assert any(gn > train_cfg.grad_clip for _, gn in ref), "clipping should be exercised"
    module, curve = _engine(model_cfg, train_cfg, topo)
    errors = {"cp2": _max_rel(curve, ref)}
    batches = _step_batches(99, model_cfg.vocab_size)
    want = ref_module.eval_loss(batches)
    errors["eval"] = abs(module.eval_loss(batches) - want) / want
    state = module.state_dict()
    ref_state = ref_module.state_dict()["model"]
    errors["model_state"] = max(float((state["model"][k] - v).abs().max()) for k, v in ref_state.items())
    topo.destroy()
    return errors


def test_cp2_lasp_loss_curve_eval_and_state() -> None:
    results = run_distributed(_cp2, 2)
    for errors in results:
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, errors


def test_cp_with_tp_is_refused() -> None:
    from parallel.config import ParallelConfig
    from parallel.engines.megatron import MegatronTrainModule
    from parallel.topology import Topology

    _, train_cfg = _configs()
    topo = Topology(tp=2, pp=1, cp=2, world_size=4)
    with pytest.raises(NotImplementedError, match="LASP"):
        MegatronTrainModule(None, train_cfg, ParallelConfig(tp=2, cp=2), topo, torch.device("cpu"))  # type: ignore[arg-type]
