"""Memory of the parallel strategies on CPU, measured in one run (fp32, TNL d=256, 4 layers).

1. ZeRO 0/1/2/3 at dp=2 (DeepSpeed, gloo), per rank process: peak resident memory over the whole
   process (``ru_maxrss``: includes building the full model on every rank before DeepSpeed
   partitions it), peak over the training steps after the first (``VmHWM`` reset once the
   optimizer state exists) and its growth above the process baseline (after imports and
   ``init_process_group``), the AdamW moments and parameter elements each rank holds; ratios to
   ZeRO-0.
2. Activation checkpointing (one process): none vs full vs selective through
   ``parallel.activation_checkpoint.apply_activation_checkpointing``; activation memory (bytes
   saved for backward, counted by a ``saved_tensors_hooks`` over one forward, parameters
   excluded) and peak RSS growth of one step, each in its own process; step time on one thread
   with the three models interleaved step by step in one process (median; wall and CPU time).
3. LASP at cp=2 vs one rank: per-rank activation bytes and forward+backward time at growing
   sequence lengths (batch 1), with ``parallel.context`` (``apply_context_parallel``,
   ``split_batch_for_cp``, ``context_parallel_loss``, ``all_reduce_gradients``); the longest
   length whose per-rank activations fit ``--budget-mib``, and the length the linear growth
   predicts for it.

The cores are shared, so wall times move with other load; process CPU time is printed beside
them. Every memory configuration runs in fresh processes so ``ru_maxrss`` is its own.

    .venv/bin/python bench/bench_parallel.py [--steps 4] [--budget-mib 512] [--only zero,ac,lasp]

Writes ``bench/results/parallel.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPE = {"vocab_size": 8000, "d_model": 256, "n_layers": 4, "n_heads": 4, "glu_dim": 704}
MIB = 2**20


def _model(shape: dict[str, int]) -> torch.nn.Module:
    from pretrain.models.transnormer import TransNormerConfig

    torch.manual_seed(0)
    return TransNormerConfig(**shape).build()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (``VmHWM``) at the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(shape: dict[str, int], b: int, n: int, seed: int = 0):
    from pretrain.data.loader import Batch

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape["vocab_size"], (b, n + 1), generator=gen)
    return Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(b, n))


def _saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _spawn(fn, nprocs: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world, queue, *args)`` on ``nprocs`` fresh processes; results by rank."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, nprocs, port, queue, args)) for r in range(nprocs)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = [v for v in results.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(nprocs)]


def _worker(fn, rank: int, world: int, port: int, queue, args) -> None:
    import multiprocessing.util
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, fn(rank, world, *args)))
        dist.barrier()
    except Exception:  # reported to the parent, which raises
        queue.put((rank, f"[rank {rank}] {traceback.format_exc()}"))
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        multiprocessing.util._exit_function()  # flushes the queue's feeder thread
        os._exit(code)  # torch + gloo can abort at a normal interpreter exit


# -- 1. ZeRO stages -------------------------------------------------------------------------------


def _zero_rank(
    rank: int, world: int, shape: dict[str, int], stage: int, steps: int, mbs: int, seq: int
) -> dict[str, float]:
    import deepspeed

    from parallel.config import ParallelConfig
    from parallel.engines.deepspeed import DeepSpeedTrainModule
    from parallel.zero import base_optimizer
    from pretrain.trainer.config import TrainConfig

    deepspeed.utils.logger.setLevel("ERROR")
    baseline = _rss_mib()
    train = TrainConfig(
        steps=steps, micro_batch_size=mbs, grad_accum=1, warmup_steps=1, precision="fp32", device="cpu"
    )
    module = DeepSpeedTrainModule(
        _model(shape),
        train,
        ParallelConfig(zero_stage=stage, engine="deepspeed"),
        torch.device("cpu"),
        ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None,
    )
    times, cpu = [], []
    for step in range(steps):
        if step == 1:  # the first step created the optimizer state; the model build is over
            _reset_peak_rss()
        t, c = time.perf_counter(), time.process_time()
        module.train_step([_batch(shape, mbs, seq, seed=step * world + rank)])
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    train_peak = _status_mib("VmHWM")
    base = base_optimizer(module.optimizer)
    moments = sum(
        v.numel() for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    local_params = sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.model.parameters()
    )
    return {
        "process_peak_rss_mib": _maxrss_mib(),
        "peak_rss_mib": train_peak,
        "baseline_rss_mib": baseline,
        "growth_mib": train_peak - baseline,
        "optimizer_moments_mib": moments * 4 / MIB,
        "local_param_mib": local_params * 4 / MIB,
        "step_s": statistics.median(times[1:] or times),
        "step_cpu_s": statistics.median(cpu[1:] or cpu),
    }


def bench_zero(shape: dict[str, int], steps: int, mbs: int, seq: int) -> list[dict[str, Any]]:
    rows = []
    for stage in (0, 1, 2, 3):
        per_rank = _spawn(_zero_rank, 2, shape, stage, steps, mbs, seq)
        row: dict[str, Any] = {"zero_stage": stage, "ranks": per_rank}
        for key in (
            "process_peak_rss_mib",
            "peak_rss_mib",
            "growth_mib",
            "optimizer_moments_mib",
            "local_param_mib",
            "step_s",
            "step_cpu_s",
        ):
            row[key] = max(r[key] for r in per_rank)
        rows.append(row)
    for row in rows:
        for key in ("peak_rss_mib", "growth_mib", "optimizer_moments_mib"):
            row[f"{key}_vs_zero0"] = row[key] / rows[0][key]
    return rows


# -- 2. activation checkpointing -------------------------------------------------------------------


def _ac_memory(rank: int, world: int, shape: dict[str, int], mode: str, b: int, seq: int) -> dict[str, float]:
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from pretrain.trainer.train_module import token_loss

    model = apply_activation_checkpointing(_model(shape), mode)
    batch = _batch(shape, b, seq)
    before = _rss_mib()
    saved, logits = _saved_activation_bytes(model, lambda: model(batch.tokens))
    token_loss(logits, batch.labels, batch.loss_mask).backward()
    return {"saved_activations_mib": saved / MIB, "step_peak_growth_mib": _maxrss_mib() - before}


def _ac_timing(
    rank: int, world: int, shape: dict[str, int], steps: int, b: int, seq: int
) -> dict[str, float]:
    """Median step time of each mode on one thread, the modes interleaved step by step in one
    process (so a neighbour's load on the shared cores hits them alike); the first step of each
    is warm-up."""
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from pretrain.trainer.train_module import token_loss

    torch.set_num_threads(1)  # one thread: the recompute cost is less hidden by the shared cores' load
    batch = _batch(shape, b, seq)
    models = {mode: apply_activation_checkpointing(_model(shape), mode) for mode in AC_MODES}
    optimizers = {mode: torch.optim.AdamW(m.parameters(), lr=1e-4) for mode, m in models.items()}
    times: dict[str, list[float]] = {mode: [] for mode in AC_MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in AC_MODES}
    for _ in range(steps + 1):
        for mode, model in models.items():
            t, c = time.perf_counter(), time.process_time()
            token_loss(model(batch.tokens), batch.labels, batch.loss_mask).backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
            times[mode].append(time.perf_counter() - t)
            cpu[mode].append(time.process_time() - c)
    return {
        mode: {"step_s": statistics.median(times[mode][1:]), "step_cpu_s": statistics.median(cpu[mode][1:])}
        for mode in AC_MODES
    }


AC_MODES = ("none", "full", "selective")


def bench_ac(shape: dict[str, int], steps: int, b: int, seq: int) -> list[dict[str, Any]]:
    timing = _spawn(_ac_timing, 1, shape, steps, b, seq)[0]
    rows = [
        {"mode": mode, **_spawn(_ac_memory, 1, shape, mode, b, seq)[0], **timing[mode]} for mode in AC_MODES
    ]
    for row in rows:
        row["activations_vs_none"] = row["saved_activations_mib"] / rows[0]["saved_activations_mib"]
        row["time_vs_none"] = row["step_s"] / rows[0]["step_s"]
        row["cpu_vs_none"] = row["step_cpu_s"] / rows[0]["step_cpu_s"]
    return rows


# -- 3. LASP context parallelism -------------------------------------------------------------------


def _lasp_run(
    rank: int, world: int, shape: dict[str, int], lengths: list[int], budget_mib: float
) -> list[dict[str, float]]:
    import torch.distributed as dist

    from parallel.context import (
        all_reduce_gradients,
        apply_context_parallel,
        context_parallel_loss,
        split_batch_for_cp,
    )
    from pretrain.trainer.train_module import token_loss

    model = _model(shape)
    if world > 1:
        apply_context_parallel(model, None)
    out = []
    for n in lengths:
        batch = split_batch_for_cp(_batch(shape, 1, n), rank, world) if world > 1 else _batch(shape, 1, n)

        def forward_loss(batch=batch):
            logits = model(batch.tokens)
            if world > 1:
                return context_parallel_loss(logits, batch.labels, batch.loss_mask, None)
            return token_loss(logits, batch.labels, batch.loss_mask) / batch.loss_mask.sum()

        if world > 1:
            dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        saved, loss = _saved_activation_bytes(model, forward_loss)
        loss.backward()
        if world > 1:
            all_reduce_gradients(model, None)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        model.zero_grad(set_to_none=True)
        stats = torch.tensor([saved / MIB, elapsed, cpu], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        out.append(
            {
                "seq_len": n,
                "activations_mib_per_rank": float(stats[0]),
                "fwd_bwd_s": float(stats[1]),
                "fwd_bwd_cpu_s": float(stats[2]),
            }
        )
        if float(stats[0]) > budget_mib:  # the next (longer) length cannot fit either
            break
    return out


def bench_lasp(shape: dict[str, int], lengths: list[int], budget_mib: float) -> dict[str, Any]:
    result: dict[str, Any] = {"budget_mib": budget_mib}
    for name, world in (("one_rank", 1), ("cp2", 2)):
        rows = _spawn(_lasp_run, world, shape, lengths, budget_mib)[0]
        fits = [r["seq_len"] for r in rows if r["activations_mib_per_rank"] <= budget_mib]
        # activations grow linearly in n: the budget's length from the two longest measured points
        (n0, a0), (n1, a1) = [(r["seq_len"], r["activations_mib_per_rank"]) for r in rows[-2:]]
        slope = (a1 - a0) / (n1 - n0)
        result[name] = {
            "rows": rows,
            "longest_fitting": max(fits) if fits else None,
            "mib_per_1k_tokens": slope * 1024,
            "budget_length_linear": int(n0 + (budget_mib - a0) / slope),
        }
    return result


# -- report ---------------------------------------------------------------------------------------


def _print(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if "zero" in results:
        t = Table(title=f"ZeRO at dp=2 (TNL {results['shape']}, fp32), per rank (max over ranks)")
        for col in (
            "stage",
            "process peak MiB",
            "train peak MiB",
            "x ZeRO-0",
            "growth MiB",
            "x ZeRO-0",
            "AdamW moments MiB",
            "x ZeRO-0",
            "params MiB",
            "step s",
            "step CPU s",
        ):
            t.add_column(col, justify="right")
        for r in results["zero"]:
            t.add_row(
                str(r["zero_stage"]),
                f"{r['process_peak_rss_mib']:.0f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['peak_rss_mib_vs_zero0']:.2f}",
                f"{r['growth_mib']:.0f}",
                f"{r['growth_mib_vs_zero0']:.2f}",
                f"{r['optimizer_moments_mib']:.1f}",
                f"{r['optimizer_moments_mib_vs_zero0']:.2f}",
                f"{r['local_param_mib']:.1f}",
                f"{r['step_s']:.2f}",
                f"{r['step_cpu_s']:.2f}",
            )
        console.print(t)
    if "activation_checkpointing" in results:
        t = Table(title="Activation checkpointing (one process)")
        cols = (
            "mode",
            "saved activations MiB",
            "x none",
            "step peak growth MiB",
            "step s",
            "x none",
            "CPU s",
            "x none",
        )
        for col in cols:
            t.add_column(col, justify="right")
        for r in results["activation_checkpointing"]:
            t.add_row(
                r["mode"],
                f"{r['saved_activations_mib']:.1f}",
                f"{r['activations_vs_none']:.2f}",
                f"{r['step_peak_growth_mib']:.0f}",
                f"{r['step_s']:.2f}",
                f"{r['time_vs_none']:.2f}",
                f"{r['step_cpu_s']:.2f}",
                f"{r['cpu_vs_none']:.2f}",
            )
        console.print(t)
    if "lasp" in results:
        lasp = results["lasp"]
        t = Table(title=f"LASP: per-rank activations (batch 1), budget {lasp['budget_mib']:.0f} MiB")
        cols = ("seq len", "one rank MiB", "fwd+bwd s", "CPU s", "cp=2 MiB/rank", "fwd+bwd s", "CPU s/rank")
        for col in cols:
            t.add_column(col, justify="right")
        one = {r["seq_len"]: r for r in lasp["one_rank"]["rows"]}
        cp = {r["seq_len"]: r for r in lasp["cp2"]["rows"]}
        for n in sorted(set(one) | set(cp)):
            a, c = one.get(n), cp.get(n)
            t.add_row(
                str(n),
                f"{a['activations_mib_per_rank']:.0f}" if a else "-",
                f"{a['fwd_bwd_s']:.2f}" if a else "-",
                f"{a['fwd_bwd_cpu_s']:.2f}" if a else "-",
                f"{c['activations_mib_per_rank']:.0f}" if c else "-",
                f"{c['fwd_bwd_s']:.2f}" if c else "-",
                f"{c['fwd_bwd_cpu_s']:.2f}" if c else "-",
            )
        console.print(t)
        for name, label in (("one_rank", "one rank"), ("cp2", "cp=2")):
            r = lasp[name]
            console.print(
                f"{label}: longest measured length within {lasp['budget_mib']:.0f} MiB/rank = {r['longest_fitting']}; "
                f"{r['mib_per_1k_tokens']:.1f} MiB per 1K tokens -> ~{r['budget_length_linear']} tokens by the linear fit"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="training steps per ZeRO / AC configuration")
    parser.add_argument("--seq", type=int, default=256, help="sequence length of the ZeRO and AC runs")
    parser.add_argument("--batch", type=int, default=2, help="samples per rank (ZeRO) / per step (AC)")
    parser.add_argument("--budget-mib", type=float, default=512.0, help="per-rank activation budget for LASP")
    parser.add_argument(
        "--lengths", default="2048,3072,4096,6144,8192,12288,16384", help="LASP sequence lengths"
    )
    parser.add_argument("--d-model", type=int, default=SHAPE["d_model"])
    parser.add_argument("--layers", type=int, default=SHAPE["n_layers"])
    parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"])
    parser.add_argument(
        "--only", default="zero,ac,lasp", help="comma-separated sections to run (zero, ac, lasp)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "parallel.json")
    args = parser.parse_args()
    start = time.perf_counter()
    shape = {**SHAPE, "d_model": args.d_model, "n_layers": args.layers, "vocab_size": args.vocab}
    shape["glu_dim"] = args.d_model * SHAPE["glu_dim"] // SHAPE["d_model"]
    only = set(args.only.split(","))
    results: dict[str, Any] = {"shape": shape, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if "zero" in only:
        results["zero"] = bench_zero(shape, args.steps, args.batch, args.seq)
    if "ac" in only:
        results["activation_checkpointing"] = bench_ac(shape, args.steps, args.batch, args.seq * 4)
    if "lasp" in only:
        results["lasp"] = bench_lasp(shape, [int(x) for x in args.lengths.split(",")], args.budget_mib)
    results["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _print(results)
    print(f"wrote {args.out} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
