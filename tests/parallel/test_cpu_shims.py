"""The CPU stand-ins for megatron-core's CUDA calls: applied only without CUDA, idempotent, and
each shimmed call does its CPU job. Runs in fresh processes so the shims start unapplied."""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for machines without CUDA")


def _shims(rank: int, world_size: int) -> dict:
    from unittest import mock

    from megatron.core import tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer

    from parallel.cpu_shims import apply_cpu_shims, shims_applied
    from parallel.topology import Topology

    out: dict = {}
    # 1. without the shims, megatron's CUDA calls fail on CPU
    with pytest.raises((AssertionError, RuntimeError)):
        GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
    # 2. a process that has CUDA is left alone
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        assert apply_cpu_shims() is False
    assert not shims_applied()
    # 3. applied once, idempotent
    assert apply_cpu_shims() is True and apply_cpu_shims() is True and shims_applied()
    assert not hasattr(torch.cuda.current_device, "__self__")  # torch.cuda itself untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()

    # the global memory buffer of sequence parallelism allocates on CPU
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")
    out["buffer_device"] = str(buf.device)

    # sequence-parallel collectives (allocate via torch.cuda.current_device())
    topo = Topology(tp=world_size, pp=1, cp=1, world_size=world_size).build()
    group = topo.tp_group
    x = torch.full((2, 3), float(rank + 1))
    gathered = tensor_parallel.gather_from_sequence_parallel_region(x, group=group)
    out["gathered"] = gathered[:, 0].tolist()
    scattered = tensor_parallel.reduce_scatter_to_sequence_parallel_region(torch.ones(4, 3), group=group)
    out["scattered"] = scattered.tolist()

    # the model-parallel RNG tracker runs on the CPU generator
    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        out["tp_draw"] = torch.rand(1).item()
    assert torch.equal(before, torch.get_rng_state())  # default stream untouched by the fork
    topo.destroy()
    return out


def test_cpu_shims_on_two_processes() -> None:
    results = run_distributed(_shims, 2)
    assert all(r["buffer_device"] == "cpu" for r in results)
    assert results[0]["gathered"] == [1.0, 1.0, 2.0, 2.0]
    assert results[0]["scattered"] == [[2.0] * 3] * 2
    # the model-parallel stream differs between TP ranks (seed + tp_rank)
    assert results[0]["tp_draw"] != results[1]["tp_draw"]
