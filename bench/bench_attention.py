"""Attention forward+backward time and peak memory against sequence length, on CPU.

Compares, at b=1, H=4, d=64, fp32 (defaults):

* ``tnl-torch``: this project's torch backend of ``linear_attention`` (Lightning Attention-2
  with the hand-written backward, :mod:`pretrain.models.transnormer.kernels.torch_la2`);
* ``sdpa``: PyTorch ``F.scaled_dot_product_attention(is_causal=True)`` (softmax attention);
* ``naive``: the masked quadratic linear attention ``((Q K^T) * M) V`` with autograd.

Time: wall clock (``--clock wall``, default) or process CPU time (``--clock cpu``; on a shared
machine CPU time with ``--threads 1`` is far steadier than wall time, since a multi-threaded op
waits for its slowest, possibly descheduled, thread). One warm-up pass, then the median of ``--passes`` passes of forward + backward (only
one pass when a pass takes over 20 s, as the O(n^2) forms do at long lengths). Each worker
first runs its implementation once at n=128 so that library initialisation is not measured.

Peak memory: torch keeps no allocator statistics for CPU tensors, so every (impl, n) runs in a
fresh subprocess that builds its inputs, reads its resident set size (``/proc/self/statm``),
then runs the passes and reports ``ru_maxrss`` (the process's peak RSS, from
``resource.getrusage``) minus that baseline: the extra memory the attention's forward and
backward needed at their peak (activations kept for backward, temporaries, the input
gradients). The baseline excludes the inputs themselves. The numbers are RSS, so they include
allocator slack; compare them between implementations, not with theoretical byte counts.

Run (2 threads, every length up to 32K where time and memory allow)::

    .venv/bin/python bench/bench_attention.py [--max-n 32768] [--passes 5] [--threads 2] [--clock wall]
    .venv/bin/python bench/bench_attention.py --block-sizes      # tune the torch block size

The naive form needs O(n^2) memory (several n x n fp32 matrices per head) and is skipped above
``--naive-max-n``; SDPA is O(n^2) in time and skipped above ``--sdpa-max-n``. Results are
printed as a table and written to ``bench/results/attention.json`` with the goal ratios: at 8K
the torch backend's speed-up over SDPA (goal >= 8x) and over naive (goal >= 2x, with >= 4x less
peak memory), and its time(16K) / time(8K) (goal <= 2.2, i.e. linear).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("tnl-torch", "sdpa", "naive")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(impl: str, n: int, passes: int, threads: int, heads: int, dim: int, block: int) -> dict:
    """Time one (impl, n) in this process and measure its peak RSS above the baseline."""
    import torch
    import torch.nn.functional as F

    from pretrain.models.transnormer.attention import (
        linear_attention,
        linear_attention_naive,
        slopes_for_layer,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    slope = slopes_for_layer(heads, 0, 4)
    fns = {
        "tnl-torch": lambda q, k, v: linear_attention(q, k, v, slope, backend="torch", block_size=block),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "naive": lambda q, k, v: linear_attention_naive(q, k, v, slope),
    }
    fn = fns[impl]

    def inputs(length: int) -> list[torch.Tensor]:
        return [torch.randn(1, heads, length, dim, requires_grad=True) for _ in range(3)]

    fn(*inputs(128)).sum().backward()  # load and initialise the kernels outside the measurement
    q, k, v = inputs(n)
    grad = torch.randn(1, heads, n, dim)
    base = _rss_mib()
    times: list[float] = []
    cpu_times: list[float] = []
    while len(times) < passes + 1:
        if len(times) == 2 and times[1] > 20:  # slow (the O(n^2) forms at 8K+): stop at 2 passes
            break
        for t in (q, k, v):
            t.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(q, k, v).backward(grad)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "impl": impl,
        "n": n,
        "wall_seconds": statistics.median(times[1:]),
        "cpu_seconds": statistics.median(cpu_times[1:]),
        "peak_mib": peak - base,
    }


def _run(impl: str, n: int, args: argparse.Namespace, block: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(n), "--passes", str(args.passes)]
    cmd += ["--threads", str(args.threads), "--heads", str(args.heads), "--dim", str(args.dim)]
    cmd += ["--block", str(block)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "n": n, "error": proc.stderr.strip().splitlines()[-1:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["seconds"] = row[f"{args.clock}_seconds"]
    return row


def _ratios(rows: list[dict]) -> dict:
    get = {(r["impl"], r["n"]): r for r in rows if "seconds" in r}
    out: dict[str, float] = {}
    tnl8, tnl16 = get.get(("tnl-torch", 8192)), get.get(("tnl-torch", 16384))
    if tnl8 and ("sdpa", 8192) in get:
        out["speedup_vs_sdpa_8k"] = get[("sdpa", 8192)]["seconds"] / tnl8["seconds"]
    if tnl8 and ("naive", 8192) in get:
        out["speedup_vs_naive_8k"] = get[("naive", 8192)]["seconds"] / tnl8["seconds"]
        out["memory_ratio_naive_over_tnl_8k"] = get[("naive", 8192)]["peak_mib"] / max(tnl8["peak_mib"], 1e-9)
    if tnl8 and tnl16:
        out["tnl_time_16k_over_8k"] = tnl16["seconds"] / tnl8["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=32768, help="longest sequence to run")
    parser.add_argument(
        "--naive-max-n", type=int, default=8192, help="longest sequence for the O(n^2)-memory naive form"
    )
    parser.add_argument(
        "--sdpa-max-n", type=int, default=16384, help="longest sequence for SDPA (O(n^2) time)"
    )
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=None, help="torch backend block size (default: its own)")
    parser.add_argument(
        "--block-sizes", action="store_true", help="time the torch backend's block sizes instead"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time the table and ratios use: wall clock, or process CPU time (steadier on a shared "
        "machine with --threads 1; both are saved)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention.json"))
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pretrain.models.transnormer.kernels.torch_la2 import DEFAULT_BLOCK_SIZE

    block = args.block or DEFAULT_BLOCK_SIZE
    if args.worker:
        impl, n = args.worker[0], int(args.worker[1])
        print(json.dumps(_worker(impl, n, args.passes, args.threads, args.heads, args.dim, block)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.block_sizes:
        table = Table(title="torch backend block size: forward+backward seconds (median)")
        table.add_column("n", justify="right")
        sizes = (16, 32, 64, 128, 256)
        for size in sizes:
            table.add_column(f"B={size}", justify="right")
        results = []
        for n in (n for n in (8192, 16384) if n <= args.max_n):
            rows = [_run("tnl-torch", n, args, size) | {"block": size} for size in sizes]
            results += rows
            table.add_row(str(n), *(f"{r.get('seconds', float('nan')):.4f}" for r in rows))
        console.print(table)
        out = args.out.with_name("attention_block_sizes.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        return

    limits = {
        "tnl-torch": args.max_n,
        "sdpa": min(args.sdpa_max_n, args.max_n),
        "naive": min(args.naive_max_n, args.max_n),
    }
    rows = []
    for n in LENGTHS:
        for impl in IMPLS:
            if n <= limits[impl]:
                rows.append(_run(impl, n, args, block))
                console.log(rows[-1])
    title = (
        f"attention fwd+bwd ({args.clock} s), b=1, H={args.heads}, d={args.dim}, fp32, {args.threads} threads"
    )
    table = Table(title=title)
    table.add_column("n", justify="right")
    for impl in IMPLS:
        table.add_column(f"{impl} s", justify="right")
        table.add_column(f"{impl} MiB", justify="right")
    by = {(r["impl"], r["n"]): r for r in rows}
    for n in sorted({r["n"] for r in rows}):
        cells = []
        for impl in IMPLS:
            r = by.get((impl, n), {})
            cells += [f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}"] if "seconds" in r else ["-", "-"]
        table.add_row(str(n), *cells)
    console.print(table)
    ratios = _ratios(rows)
    for key, value in ratios.items():
        console.print(f"{key}: {value:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "heads": args.heads,
        "dim": args.dim,
        "threads": args.threads,
        "passes": args.passes,
        "block": block,
        "clock": args.clock,
    }
    args.out.write_text(json.dumps({"config": config, "rows": rows, "ratios": ratios}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
