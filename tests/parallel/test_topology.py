"""Topology: degree arithmetic without process groups, and megatron's groups on 4 gloo processes."""

from __future__ import annotations

import pytest

from parallel.config import ParallelConfig
from parallel.topology import RankCoords, Topology
from pretrain.models.transnormer.config import TransNormerConfig
from tests._dist import run_distributed


def test_from_config_derives_dp() -> None:
    topo = Topology.from_config(ParallelConfig(tp=2, pp=2), world_size=8)
    assert (topo.tp, topo.pp, topo.cp, topo.dp) == (2, 2, 1, 2)
    assert topo.tp_enabled and topo.model_parallel_size == 4 and not topo.is_built


def test_world_size_must_divide() -> None:
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        Topology.from_config(ParallelConfig(tp=2, pp=2), world_size=6)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        Topology(tp=0, pp=1, cp=1, world_size=2)


def test_coords_follow_megatron_order() -> None:
    topo = Topology(tp=2, pp=2, cp=1, world_size=8)  # order tp-cp-ep-dp-pp
    assert [topo.coords(r) for r in (0, 1, 2, 5, 7)] == [
        RankCoords(tp=0, cp=0, dp=0, pp=0),
        RankCoords(tp=1, cp=0, dp=0, pp=0),
        RankCoords(tp=0, cp=0, dp=1, pp=0),
        RankCoords(tp=1, cp=0, dp=0, pp=1),
        RankCoords(tp=1, cp=0, dp=1, pp=1),
    ]
    topo = Topology(tp=2, pp=1, cp=2, world_size=8)
    assert topo.coords(6) == RankCoords(tp=0, cp=1, dp=1, pp=0)
    with pytest.raises(ValueError, match="out of range"):
        topo.coords(8)


def test_validate_for_model_names_every_problem() -> None:
    model = TransNormerConfig(vocab_size=101, d_model=48, n_layers=3, n_heads=3, glu_dim=51)
    topo = Topology(tp=2, pp=2, cp=2, world_size=8)
    with pytest.raises(ValueError) as err:
        topo.validate_for_model(model, seq_len=17, sequence_parallel=True)
    msg = str(err.value)
    for part in (
        "n_heads=3 is not divisible by parallel.tp=2",
        "glu_dim=51",
        "vocab_size=101",
        "e.g. 102",
        "n_layers=3 is not divisible by parallel.pp=2",
        "seq_len=17 is not divisible by parallel.cp=2",
        "tp*cp=4",
    ):
        assert part in msg, part
    Topology(tp=2, pp=1, cp=1, world_size=2).validate_for_model(
        TransNormerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, glu_dim=48), seq_len=16,
        sequence_parallel=True,
    )  # fmt: skip


def test_groups_need_build() -> None:
    topo = Topology(tp=1, pp=1, cp=1, world_size=1)
    with pytest.raises(RuntimeError, match="build"):
        topo.tp_group  # noqa: B018
    with pytest.raises(RuntimeError, match="init_process_group"):
        topo.build()


def _groups(rank: int, world_size: int) -> list[dict]:
    import torch.distributed as dist

    out = []
    for tp, pp in ((2, 1), (2, 2)):
        topo = Topology(tp=tp, pp=pp, cp=1, world_size=world_size).build()
        coords = topo.coords(rank)
        assert (topo.tp_rank, topo.dp_rank, topo.pp_rank, topo.cp_rank) == (
            coords.tp,
            coords.dp,
            coords.pp,
            coords.cp,
        )
        members = {
            name: sorted(dist.get_process_group_ranks(getattr(topo, f"{name}_group")))
            for name in ("tp", "dp", "pp")
        }
        pgs = topo.pgs
        assert pgs.tp is topo.tp_group and pgs.dp is topo.dp_group and pgs.pp is topo.pp_group
        out.append({**members, "first": topo.is_first_stage, "last": topo.is_last_stage})
        with pytest.raises(RuntimeError, match="already exist"):
            Topology(tp=tp, pp=pp, cp=1, world_size=world_size).build()
        topo.destroy()
        assert not topo.is_built
    return out


def test_groups_on_four_processes() -> None:
    results = run_distributed(_groups, 4)
    # tp=2, dp=2: TP groups are consecutive ranks, DP groups stride over them
    assert [r[0]["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[0]["dp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r[0]["first"] and r[0]["last"] for r in results)
    # tp=2, pp=2: pipeline stages are the outermost axis
    assert [r[1]["pp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r[1]["dp"] for r in results] == [[0], [1], [2], [3]]
    assert [(r[1]["first"], r[1]["last"]) for r in results] == [(True, False)] * 2 + [(False, True)] * 2
