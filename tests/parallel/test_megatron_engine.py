"""MegatronTrainModule gives the single-process TrainModule's loss curve (tp=2, tp=2 + sequence
parallel, tp=2 x dp=2) and its checkpoints reshard to and from the single-process layout."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed

TOL = 1e-5
STEPS = 10


def _configs():
    from pretrain.models.transnormer.config import TransNormerConfig
    from pretrain.trainer.config import TrainConfig

    model = TransNormerConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, glu_dim=48, lrpe_layers=[0], attention_block_size=8
    )
    train = TrainConfig(
        steps=STEPS,
        lr=1e-2,
        warmup_steps=2,
        grad_clip=0.5,
        precision="fp32",
        device="cpu",
        micro_batch_size=4,
    )
    return model, train


def _step_batches(step: int, vocab: int):
    """Two micro-batches of 4 x 16 tokens; a partial loss mask so token counts differ per sample."""
    from pretrain.data.loader import Batch

    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(2):
        tokens = torch.randint(0, vocab, (4, 17), generator=g)
        mask = (torch.rand(4, 16, generator=g) > 0.25).float()
        out.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask))
    return out


def _dp_slice(batches, dp_rank: int, dp: int):
    from pretrain.data.loader import Batch

    def part(t):
        return t.chunk(dp, dim=0)[dp_rank]

    return [Batch(part(b.tokens), part(b.labels), part(b.loss_mask)) for b in batches]


def _reference(model_cfg, train_cfg, steps=STEPS, state=None, start=0):
    from pretrain.trainer.train_module import TrainModule

    torch.manual_seed(0)
    module = TrainModule(model_cfg.build(), train_cfg, torch.device("cpu"))
    if state is not None:
        module.load_state_dict(state)
    curve = []
    for s in range(start, start + steps):
        out = module.train_step(_step_batches(s, model_cfg.vocab_size))
        curve.append((float(out["loss"]), float(out["grad_norm"])))
    return module, curve


def _megatron(model_cfg, train_cfg, topo, *, sp=False, steps=STEPS, state=None, start=0):
    from parallel.config import ParallelConfig
    from parallel.engines.megatron import MegatronTrainModule

    torch.manual_seed(0)
    pcfg = ParallelConfig(tp=topo.tp, engine="megatron")
    module = MegatronTrainModule(
        model_cfg.build(), train_cfg, pcfg, topo, torch.device("cpu"), sequence_parallel=sp
    )  # fmt: skip
    if state is not None:
        module.load_state_dict(state)
    curve = []
    for s in range(start, start + steps):
        batches = _dp_slice(_step_batches(s, model_cfg.vocab_size), topo.dp_rank, topo.dp)
        out = module.train_step(batches)
        curve.append((float(out["loss"]), float(out["grad_norm"])))
    return module, curve


def _max_rel(a, b) -> float:
    return max(abs(x - y) / abs(y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def _curves(rank: int, world_size: int, tp: int) -> dict[str, float]:
    from parallel.topology import Topology

    model_cfg, train_cfg = _configs()
    topo = Topology(tp=tp, pp=1, cp=1, world_size=world_size).build()
    _, ref = _reference(model_cfg, train_cfg)
    assert any(gn > train_cfg.grad_clip for _, gn in ref), "clipping should be exercised"
    errors = {}
    _, curve = _megatron(model_cfg, train_cfg, topo)
    errors["tp"] = _max_rel(curve, ref)
    if world_size == tp:  # tp=2 only: also sequence parallel, and checkpoint resharding
        _, curve = _megatron(model_cfg, train_cfg, topo, sp=True)
        errors["tp_sp"] = _max_rel(curve, ref)
        errors.update(_reshard(rank, model_cfg, train_cfg, topo, ref))
    # eval: the single-process mean over all DP ranks' batches
    ref_module, _ = _reference(model_cfg, train_cfg, steps=0)
    module, _ = _megatron(model_cfg, train_cfg, topo, steps=0)
    batches = _step_batches(99, model_cfg.vocab_size)
    got = module.eval_loss(_dp_slice(batches, topo.dp_rank, topo.dp))
    errors["eval"] = abs(got - ref_module.eval_loss(batches)) / ref_module.eval_loss(batches)
    topo.destroy()
    return errors


def _reshard(rank, model_cfg, train_cfg, topo, ref) -> dict[str, float]:
    """tp=2 state after 5 steps -> single-process TrainModule continues; and the reverse."""
    import torch.distributed as dist

    half = STEPS // 2
    module, _ = _megatron(model_cfg, train_cfg, topo, steps=half)
    state = module.state_dict()
    if topo.tp_rank != 0:
        assert state == {}
    box = [state]
    dist.broadcast_object_list(box, src=0)  # the "checkpoint file" every rank reads
    _, cont = _reference(model_cfg, train_cfg, steps=STEPS - half, state=box[0], start=half)

    ref_module, _ = _reference(model_cfg, train_cfg, steps=half)
    _, cont_tp = _megatron(
        model_cfg, train_cfg, topo, steps=STEPS - half, state=ref_module.state_dict(), start=half
    )
    return {"tp2_to_tp1": _max_rel(cont, ref[half:]), "tp1_to_tp2": _max_rel(cont_tp, ref[half:])}


def _check(results) -> None:
    for errors in results:
        bad = {k: v for k, v in errors.items() if v > TOL}
        assert not bad, errors


def test_tp2_loss_curve_sequence_parallel_and_resharding() -> None:
    results = run_distributed(_curves, 2, 2)
    _check(results)
    assert {"tp", "tp_sp", "tp2_to_tp1", "tp1_to_tp2", "eval"} <= set(results[0])


def test_tp2_dp2_loss_curve_on_four_processes() -> None:
    _check(run_distributed(_curves, 4, 2))


def test_unsupported_layouts_are_named() -> None:
    from parallel.config import ParallelConfig
    from parallel.engines.megatron import MegatronTrainModule
    from parallel.topology import Topology

    _, train_cfg = _configs()
    topo = Topology(tp=1, pp=2, cp=1, world_size=2)
    with pytest.raises(NotImplementedError, match="deepspeed"):
        MegatronTrainModule(None, train_cfg, ParallelConfig(zero_stage=1), topo, torch.device("cpu"))  # type: ignore[arg-type]
    bf16 = train_cfg.model_copy(update={"precision": "bf16"})
    with pytest.raises(NotImplementedError, match="precision=fp32"):
        MegatronTrainModule(None, bf16, ParallelConfig(), topo, torch.device("cpu"))  # type: ignore[arg-type]
