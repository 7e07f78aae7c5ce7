"""Training throughput and decode latency of TransNormerLLM on this machine.

Times the real training step (``TrainModule.train_step``: forward, backward, clipping, AdamW)
and the recurrent decoder, median of several passes, and prints a table plus JSON.

    .venv/bin/python bench/bench_train.py [--threads 2] [--passes 3] [--out bench/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pretrain.data.loader import Batch
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.config import TrainConfig
from pretrain.trainer.train_module import TrainModule

SHAPES = {
    # the quickstart / configs/tnl-tiny.yaml model
    "tnl-tiny": TransNormerConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, glu_dim=352),
    # the shape of the peer figures in the platform notes (4 layers, d=256, 4 heads, glu 704, vocab 8000)
    "tnl-peer": TransNormerConfig(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, glu_dim=704),
}
TRAIN_SHAPES = [(8, 256), (4, 512), (1, 2048)]
DECODE_CONTEXTS = [256, 1024, 4096]


def bench_train(cfg: TransNormerConfig, batch: int, seq: int, passes: int, steps: int) -> dict:
    torch.manual_seed(0)
    module = TrainModule(cfg.build(), TrainConfig(steps=10_000, micro_batch_size=batch), torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    mb = Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(batch, seq))
    module.train_step([mb])  # warm-up
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(steps):
            module.train_step([mb])
        times.append((time.perf_counter() - start) / steps)
    step = statistics.median(times)
    tps = batch * seq / step
    return {
        "batch": batch,
        "seq_len": seq,
        "step_ms": 1e3 * step,
        "tokens_per_second": tps,
        "tflops": tps * cfg.flops_per_token(seq) / 1e12,
    }


@torch.no_grad()
def bench_decode(cfg: TransNormerConfig, context: int, passes: int, tokens: int = 32) -> dict:
    torch.manual_seed(0)
    model = cfg.build().eval()
    _, state = model.prefill(torch.randint(0, cfg.vocab_size, (1, context)))
    tok = torch.zeros(1, dtype=torch.long)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(tokens):
            _, state = model.decode_step(tok, state)
        times.append((time.perf_counter() - start) / tokens)
    state_mib = sum(kv.numel() * kv.element_size() for kv in state.kv) / 2**20
    return {"context": context, "ms_per_token": 1e3 * statistics.median(times), "state_mib": state_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="train steps per pass")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, cfg in SHAPES.items():
        for batch, seq in TRAIN_SHAPES:
            rows.append(
                {"model": name, "kind": "train", **bench_train(cfg, batch, seq, args.passes, args.steps)}
            )
        for ctx in DECODE_CONTEXTS:
            rows.append({"model": name, "kind": "decode", **bench_decode(cfg, ctx, args.passes)})

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"TransNormerLLM on CPU, fp32, {args.threads} threads, median of {args.passes}")
    for col in ("model", "measure", "shape", "value"):
        table.add_column(col)
    for r in rows:
        if r["kind"] == "train":
            table.add_row(
                r["model"],
                "train tokens/s",
                f"{r['batch']} x {r['seq_len']}",
                f"{r['tokens_per_second']:.0f} ({r['step_ms']:.0f} ms/step)",
            )
        else:
            table.add_row(
                r["model"],
                "decode ms/token",
                f"context {r['context']}",
                f"{r['ms_per_token']:.2f} (state {r['state_mib']:.2f} MiB)",
            )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "passes": args.passes}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
