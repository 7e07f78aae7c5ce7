"""The multi-process harness itself: real gloo collectives, results by rank, failures surface."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed


def _all_reduce(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def test_all_reduce_over_gloo() -> None:
    assert run_distributed(_all_reduce, 3) == [6.0, 6.0, 6.0]


def test_failure_names_rank_and_error() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1.*boom on purpose"):
        run_distributed(_fail_on_rank_one, 2, timeout=120)
