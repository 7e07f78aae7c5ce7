"""Run a function on N real ``torch.distributed`` processes (gloo on CPU) and collect results.

Modelled on OLMo-core's ``run_distributed_test``: a free port, one spawned process per rank,
per-rank tracebacks on failure. Workers end with barrier + destroy + ``os._exit`` because torch
2.13 with gloo can abort at interpreter exit otherwise (see the platform notes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_wire(obj: Any) -> Any:
    """Tensors travel as numpy arrays: a tensor sent through a queue lives in shared memory that
    vanishes when the worker ``os._exit`` s before the parent has read it."""
    import torch

    if isinstance(obj, torch.Tensor):
        return ("__tensor__", obj.detach().cpu().numpy().copy())
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_wire(v) for v in obj)
    return obj


def _from_wire(obj: Any) -> Any:
    import torch

    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return torch.from_numpy(obj[1])
    if isinstance(obj, dict):
        return {k: _from_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_wire(v) for v in obj)
    return obj


def _worker(
    func: Callable[..., Any], rank: int, world_size: int, port: int, backend: str, args: tuple, queue: Any
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = func(rank, world_size, *args)
        queue.put((rank, "ok", _to_wire(result)))
        dist.barrier()
    except BaseException:
        queue.put((rank, "error", f"[rank {rank}] {traceback.format_exc()}"))
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        mp.util._exit_function()  # end helper processes (e.g. async checkpoint writers) too
        os._exit(code)


def run_distributed(
    func: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo", timeout: float = 600
) -> list[Any]:
    """Run ``func(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    ``func`` must be importable (module level) and its result picklable. Raises RuntimeError
    with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(func, r, world_size, port, backend, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = _from_wire(payload)
            else:
                errors.append(payload)
                break
    except Exception as exc:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout}s waiting for ranks ({type(exc).__name__})")
    for p in procs:
        p.join(timeout=30 if not errors else 5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"workers exited with codes {bad}")
    return [results[r] for r in range(world_size)]
