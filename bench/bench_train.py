"""Training throughput and MFU: TransNormerLLM vs the softmax-attention baseline, same shapes.

Times the real training step (``TrainModule.train_step``: forward, backward, clipping, AdamW) in
fp32; median over passes of the mean step time of a pass, passes alternating between the two
models. MFU uses the same FLOP count as
training (each config's ``flops_per_token``) and ``pretrain.trainer.flops.peak_flops``.
Decode latency against context length is measured by ``bench/bench_decode.py``.

    .venv/bin/python bench/bench_train.py [--threads 2] [--passes 3] [--no-large]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.data.loader import Batch
from pretrain.models.softmax import SoftmaxConfig
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.flops import peak_flops
from pretrain.trainer.train_module import TrainModule


@dataclass(frozen=True)
class Shape:
    """One model shape, built as TransNormerLLM and as the softmax baseline."""

    vocab: int
    d: int
    layers: int
    heads: int
    ffn: int
    tied: bool = False
    large: bool = False
    """Slow on CPU: two passes of one step instead of ``--passes`` x ``--steps``."""

    def tnl(self) -> TransNormerConfig:
        return TransNormerConfig(vocab_size=self.vocab, d_model=self.d, n_layers=self.layers,
                                 n_heads=self.heads, glu_dim=self.ffn, tie_word_embeddings=self.tied)  # fmt: skip

    def softmax(self) -> SoftmaxConfig:
        return SoftmaxConfig(vocab_size=self.vocab, d_model=self.d, n_layers=self.layers,
                             n_heads=self.heads, ffn_dim=self.ffn, tie_word_embeddings=self.tied)  # fmt: skip


SHAPES = {
    # the quickstart / configs/tnl-tiny.yaml model
    "tiny": Shape(vocab=4096, d=128, layers=4, heads=4, ffn=352),
    # the shape of the peer figures in the platform notes
    "peer": Shape(vocab=8000, d=256, layers=4, heads=4, ffn=704),
    # the released 385M's layer and vocabulary (tied), with 2 of its 24 layers
    "385m-2L": Shape(vocab=64000, d=1024, layers=2, heads=8, ffn=2816, tied=True, large=True),
}
BATCHES = [(4, 512), (1, 2048)]
PEER = {  # platform notes: authors' TNL HF code / Llama (SDPA), tokens/s, same machine kind
    ("peer", 4, 512): (2313, 2672),
    ("peer", 1, 2048): (1163, 2181),
}


def _module(cfg: Any, batch: int, seq: int) -> tuple[TrainModule, list[Batch]]:
    torch.manual_seed(0)
    module = TrainModule(cfg.build(), TrainConfig(steps=10_000, micro_batch_size=batch), torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    mbs = [Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(batch, seq))]
    module.train_step(mbs)  # warm-up
    return module, mbs


def bench_pair(cfgs: dict[str, Any], batch: int, seq: int, passes: int, steps: int) -> dict[str, Any]:
    """Time each config's train step; passes alternate between the configs so that a change in
    machine load affects both alike."""
    setups = {kind: _module(cfg, batch, seq) for kind, cfg in cfgs.items()}
    times: dict[str, list[float]] = {kind: [] for kind in cfgs}
    for _ in range(passes):
        for kind, (module, mbs) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                module.train_step(mbs)
            times[kind].append((time.perf_counter() - start) / steps)
    out = {}
    for kind, cfg in cfgs.items():
        step = statistics.median(times[kind])
        tps = batch * seq / step
        flops = tps * cfg.flops_per_token(seq)
        out[kind] = {
            "step_ms": 1e3 * step,
            "tokens_per_second": tps,
            "tflops": flops / 1e12,
            "mfu": flops / peak_flops(torch.device("cpu")),
            "params": cfg.num_params(),
            "flops_per_token": cfg.flops_per_token(seq),
        }
    return out


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("shape", "batch", "TNL tok/s", "TNL MFU", "softmax tok/s", "softmax MFU", "TNL / softmax"):
        table.add_column(col, justify="right" if col != "shape" else "left")
    for r in rows:
        t, s = r["tnl"], r["softmax"]
        table.add_row(
            r["shape"],
            f"{r['batch']} x {r['seq_len']}",
            f"{t['tokens_per_second']:.0f}",
            f"{100 * t['mfu']:.1f}%",
            f"{s['tokens_per_second']:.0f}",
            f"{100 * s['mfu']:.1f}%",
            f"{t['tokens_per_second'] / s['tokens_per_second']:.2f}x",
        )
    console = Console()
    console.print(table)
    for r in rows:
        peer = PEER.get((r["shape"], r["batch"], r["seq_len"]))
        if peer:
            tps = r["tnl"]["tokens_per_second"]
            console.print(
                f"peer {r['batch']}x{r['seq_len']}: TNL {tps:.0f} tok/s = {tps / peer[0]:.2f}x the authors' code "
                f"({peer[0]}), {tps / peer[1]:.2f}x their Llama SDPA ({peer[1]}) [peer figures: platform notes]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="train steps per pass")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-large", action="store_true", help="skip the 385M-shaped model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    load_before = os.getloadavg()[0]
    for name in args.shapes:
        shape = SHAPES[name]
        if shape.large and args.no_large:
            continue
        passes, steps = (2, 1) if shape.large else (args.passes, args.steps)
        for batch, seq in BATCHES:
            cfgs = {"tnl": shape.tnl(), "softmax": shape.softmax()}
            row = {
                "shape": name,
                "batch": batch,
                "seq_len": seq,
                **bench_pair(cfgs, batch, seq, passes, steps),
            }
            rows.append(row)
            print(
                f"{name} {batch}x{seq}: TNL {row['tnl']['tokens_per_second']:.0f} tok/s, "
                f"softmax {row['softmax']['tokens_per_second']:.0f} tok/s",
                flush=True,
            )
    peak = peak_flops(torch.device("cpu"))
    title = (
        f"Training step (fwd+bwd+AdamW), fp32, {args.threads} threads, median of {args.passes} x "
        f"{args.steps} steps (385m-2L: 2 x 1); MFU vs CPU peak {peak / 1e9:.0f} GFLOP/s"
    )
    print_table(rows, title)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "passes": args.passes,
        "steps": args.steps,
        "peak_flops": peak,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
