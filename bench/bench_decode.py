"""Per-token decode latency and decoding-state memory against context length: TransNormerLLM
(recurrent, constant-size state) vs the softmax-attention baseline (growing KV cache).

Both models have the same shape (4 layers, d=256, 4 heads, SGLU/SwiGLU 704, vocab 8000), batch 1,
fp32. Each context is prefilled (TNL with its block form; softmax with one causal SDPA call that fills the KV cache),
then ``decode_step`` is timed: median over passes of the mean ms/token of a pass. The passes
interleave all models and contexts, so the ratios are robust to drifting machine load.

    .venv/bin/python bench/bench_decode.py [--threads 2] [--passes 5] [--contexts 256 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.models.softmax import SoftmaxConfig
from pretrain.models.transnormer import TransNormerConfig

VOCAB, D, LAYERS, HEADS, FFN = 8000, 256, 4, 4, 704
CONFIGS: dict[str, Any] = {
    "tnl": TransNormerConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, glu_dim=FFN),
    "softmax": SoftmaxConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, ffn_dim=FFN),
}
CONTEXTS = [256, 1024, 4096, 16384]
SOFTMAX_PREFILL_CHUNK: int | None = None
"""None: one causal SDPA call (its CPU flash kernel keeps memory linear); chunks would need an
explicit mask, which SDPA computes with its slower quadratic-memory kernel."""


def state_bytes(state: Any) -> int:
    """Bytes of a decoding state: TNL's per-layer fp32 states, or the filled part of a KV cache."""
    if hasattr(state, "nbytes"):
        return state.nbytes()
    return sum(kv.numel() * kv.element_size() for kv in state.kv)


@torch.no_grad()
def prefill(name: str, model: nn.Module, ids: torch.Tensor) -> Any:
    if name == "softmax":
        _, state = model.prefill(ids, chunk_size=SOFTMAX_PREFILL_CHUNK)
    else:
        _, state = model.prefill(ids)
    return state


@dataclass
class Case:
    """One model at one context: the state it decodes from and the timings so far."""

    name: str
    model: nn.Module
    context: int
    state: Any
    token: torch.Tensor
    prefill_s: float
    state_mib: float
    times: list[float] = field(default_factory=list)


@torch.no_grad()
def prepare(name: str, model: nn.Module, context: int) -> Case:
    """Prefill ``context`` random tokens and run a few warm-up decode steps."""
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, VOCAB, (1, context), generator=gen)
    start = time.perf_counter()
    state = prefill(name, model, ids)
    prefill_s = time.perf_counter() - start
    case = Case(name, model, context, state, ids[:, -1], prefill_s, state_bytes(state) / 2**20)
    run_pass(case, tokens=4)
    case.times.clear()
    return case


@torch.no_grad()
def run_pass(case: Case, tokens: int) -> None:
    """Decode ``tokens`` greedy tokens from the case's state; record the mean seconds per token."""
    tok, state = case.token, case.state
    start = time.perf_counter()
    for _ in range(tokens):
        logits, state = case.model.decode_step(tok, state)
        tok = logits.argmax(-1)
    case.times.append((time.perf_counter() - start) / tokens)
    case.token, case.state = tok, state


def result(case: Case) -> dict[str, Any]:
    return {
        "model": case.name,
        "context": case.context,
        "ms_per_token": 1e3 * statistics.median(case.times),
        "ms_per_token_passes": [1e3 * t for t in case.times],
        "state_mib": case.state_mib,
        "prefill_s": case.prefill_s,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: latency at the longest context over the shortest, and memory likewise."""
    out = {}
    for name in CONFIGS:
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            out[name] = {
                "from_context": lo["context"],
                "to_context": hi["context"],
                "latency_ratio": hi["ms_per_token"] / lo["ms_per_token"],
                "memory_ratio": hi["state_mib"] / lo["state_mib"],
            }
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, dict[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {(r["model"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    table = Table(title=title)
    table.add_column("context")
    for name in CONFIGS:
        table.add_column(f"{name} ms/token")
        table.add_column(f"{name} state MiB")
    table.add_column("softmax / tnl latency")
    for ctx in contexts:
        cells = [str(ctx)]
        for name in CONFIGS:
            r = by.get((name, ctx))
            cells += [f"{r['ms_per_token']:.2f}", f"{r['state_mib']:.2f}"] if r else ["-", "-"]
        t, s = by.get(("tnl", ctx)), by.get(("softmax", ctx))
        cells.append(f"{s['ms_per_token'] / t['ms_per_token']:.2f}x" if t and s else "-")
        table.add_row(*cells)
    console = Console()
    console.print(table)
    for name, s in summary.items():
        console.print(
            f"{name}: latency({s['to_context']}) / latency({s['from_context']}) = "
            f"{s['latency_ratio']:.2f}, state memory x{s['memory_ratio']:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per pass")
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    cases = []
    for name in args.models:
        torch.manual_seed(0)
        model = CONFIGS[name].build().eval()
        for ctx in args.contexts:
            cases.append(prepare(name, model, ctx))
            print(f"{name:8s} context {ctx:6d}: prefill {cases[-1].prefill_s:.1f} s", flush=True)
    # Passes interleave every model and context, so a change in machine load hits all alike.
    for _ in range(args.passes):
        for case in cases:
            run_pass(case, args.tokens)
    rows = [result(c) for c in cases]
    summary = summarise(rows)
    title = (
        f"Decode, batch 1, fp32, {args.threads} threads, median of {args.passes} x {args.tokens} tokens "
        f"({LAYERS} layers, d={D}, {HEADS} heads, ffn {FFN}, vocab {VOCAB})"
    )
    print_table(rows, summary, title)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "passes": args.passes,
        "tokens_per_pass": args.tokens,
        "shape": {"vocab": VOCAB, "d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "ffn": FFN},
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
