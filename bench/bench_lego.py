"""Lego-MT: training memory localized vs all-resident as groups grow, and step time per flow.

1. Analytic training-state bytes (fp32 weights + grads + two AdamW moments) on the
   M2M-100-1.2B shape: localized (one group's branches + main + m2m resident, stage 1 trains
   embed/main/m2m/enc-branch) against all branches resident and trained (conventional multi-way).
2. Measured peak RSS of a child process that builds a small model and takes one stage-1 step per
   group, localized (branches swapped, one group at a time) vs all resident.
3. Forward+backward+AdamW step time of each flow bitmask on the small shape (median of passes).
4. Analytic localized training state per rank on the M2M-100-1.2B shape with the blocks split
   over ``parallel.tp`` ranks (attention heads and FFN columns; the embedding, LayerNorms and
   row-parallel biases stay whole on every rank).

    .venv/bin/python bench/bench_lego.py [--threads 2] [--groups 1 2 4 8] [--passes 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from pretrain.lego.stages import STAGE_FLOWS, set_trainable
from pretrain.models.lego_mt import LegoMTConfig, flow_names
from pretrain.models.lego_mt.config import m2m_1_2b

GiB = 1024**3
SMALL = dict(
    vocab_size=8000, d_model=256, n_heads=4, ffn_dim=1024, encoder_layers=2, decoder_layers=2, dropout=0.0
)


def analytic(groups: list[int]) -> list[dict]:
    rows = []
    for g in groups:
        p = m2m_1_2b([f"g{i}" for i in range(g)]).num_params_per_part()
        shared = p["embed"] + p["encoder"] + p["decoder"]
        all_params = shared + g * (p["encoder"] + p["decoder"])
        local_params = shared + p["encoder"] + p["decoder"]
        local_trained = shared + p["encoder"]
        rows.append({
            "groups": g,
            "all_resident_GiB": round(all_params * 16 / GiB, 1),
            "localized_GiB": round((local_params * 4 + local_trained * 12) / GiB, 1),
            "params_all_B": round(all_params / 1e9, 2),
        })  # fmt: skip
    return rows


def _split_params(cfg: LegoMTConfig) -> dict[str, int]:
    """Parameters of one encoder / decoder that tensor parallelism splits (column-parallel
    weights and biases, row-parallel weights)."""
    d, f = cfg.d_model, cfg.ffn_dim
    attn, ffn = 4 * d * d + 3 * d, 2 * d * f + f
    return {"encoder": cfg.encoder_layers * (attn + ffn), "decoder": cfg.decoder_layers * (2 * attn + ffn)}


def analytic_tp(tps: list[int]) -> list[dict]:
    """Localized stage-1 training state per rank (fp32 weights of the resident parts, grads and
    AdamW moments of the trained ones) when the blocks are split over ``tp`` ranks."""
    cfg = m2m_1_2b(["g0"])
    p, split = cfg.num_params_per_part(), _split_params(cfg)
    rows = []
    for tp in tps:
        enc = p["encoder"] - split["encoder"] + split["encoder"] / tp
        dec = p["decoder"] - split["decoder"] + split["decoder"] / tp
        resident = p["embed"] + 2 * enc + 2 * dec  # main + enc branch, m2m + dec branch
        trained = p["embed"] + 2 * enc + dec  # stage 1: embed, main, m2m, enc branch
        rows.append({"tp": tp, "localized_GiB_per_rank": round((resident * 4 + trained * 12) / GiB, 1)})
    return rows


def _print(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    t = Table(title="Lego-MT training state, M2M-100-1.2B shape, fp32 AdamW (analytic)")
    for col in ("groups", "all branches resident GiB", "localized GiB", "parameters (all) B"):
        t.add_column(col, justify="right")
    for r in res["analytic_m2m_1.2b"]:
        t.add_row(*(str(r[k]) for k in ("groups", "all_resident_GiB", "localized_GiB", "params_all_B")))
    console.print(t)
    t = Table(title="Localized training per rank, blocks split over tp ranks (analytic)")
    t.add_column("tp", justify="right")
    t.add_column("GiB per rank", justify="right")
    for r in res["analytic_tp_m2m_1.2b"]:
        t.add_row(str(r["tp"]), str(r["localized_GiB_per_rank"]))
    console.print(t)
    t = Table(title=f"Peak RSS, one stage-1 step per group, small shape ({res['threads']} threads)")
    for col in ("groups", "localized MiB", "all resident MiB", "all / localized"):
        t.add_column(col, justify="right")
    for r in res["measured_small"]:
        loc, full = r["localized_peak_rss_MiB"], r["all_peak_rss_MiB"]
        t.add_row(str(r["groups"]), f"{loc:.0f}", f"{full:.0f}", f"{full / loc:.2f}")
    console.print(t)
    t = Table(title=f"Step time per flow, small shape, {res['batch']}")
    for col in ("flows", "ms (median)", "x Dec-Flow"):
        t.add_column(col, justify="right")
    times = res["step_ms_per_flow_small"]
    for name, ms in times.items():
        t.add_row(name, f"{ms:.0f}", f"{ms / times['dec']:.2f}")
    console.print(t)


def _batch(vocab: int, b: int = 16, n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(8, vocab, (b, n), generator=g)
    tgt = torch.randint(8, vocab, (b, n + 1), generator=g)
    return src, tgt[:, :-1], tgt[:, 1:]


def _peak_child(q, mode: str, n_groups: int, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg = LegoMTConfig(**SMALL, groups=[f"g{i}" for i in range(n_groups)])
    src, tgt_in, labels = _batch(cfg.vocab_size)
    if mode == "all":
        model = cfg.build()
        opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-4)
        for g in cfg.groups:
            opt.zero_grad(set_to_none=True)
            model(src, tgt_in, STAGE_FLOWS[1], g, labels=labels)["loss"].backward()
            opt.step()
    else:
        model = cfg.build(resident=[])
        saved: dict[str, dict] = {}
        for g in cfg.groups:
            model.add_group(g)
            opt = torch.optim.AdamW(set_trainable(model, 1, g), lr=1e-4)
            opt.zero_grad(set_to_none=True)
            model(src, tgt_in, STAGE_FLOWS[1], g, labels=labels)["loss"].backward()
            opt.step()
            saved[g] = {k: v.clone() for k, v in model.enc_branches[g].state_dict().items()}
            torch.save(saved.pop(g), "/dev/null")  # stands in for the partition write
            model.drop_group(g)
            del opt
    q.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB


def measured(groups: list[int], threads: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for g in groups:
        row = {"groups": g}
        for mode in ("localized", "all"):
            q = ctx.Queue()
            p = ctx.Process(target=_peak_child, args=(q, mode, g, threads))
            p.start()
            row[f"{mode}_peak_rss_MiB"] = round(q.get(), 1)
            p.join()
        rows.append(row)
    return rows


def step_times(passes: int, steps: int) -> dict[str, float]:
    cfg = LegoMTConfig(**SMALL, groups=["g0"])
    torch.manual_seed(0)
    model = cfg.build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src, tgt_in, labels = _batch(cfg.vocab_size)
    masks = (1, 2, 4, 6, 7)
    times: dict[int, list[float]] = {m: [] for m in masks}
    for i in range(passes + 1):  # passes alternate between flows so machine noise is shared
        for flows in masks:
            t = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                model(src, tgt_in, flows, "g0", labels=labels)["loss"].backward()
                opt.step()
            if i:  # the first pass is warmup (allocates every AdamW state)
                times[flows].append((time.perf_counter() - t) / steps)
    out = {"+".join(flow_names(m)): round(statistics.median(times[m]) * 1000, 1) for m in masks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/lego.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {
        "analytic_m2m_1.2b": analytic([1, 2, 4, 7, 16]),
        "analytic_tp_m2m_1.2b": analytic_tp([1, 2, 4, 8]),
        "measured_small": measured(args.groups, args.threads),
        "step_ms_per_flow_small": step_times(args.passes, args.steps),
        "small_shape": SMALL,
        "batch": "16 x 32 source / 32 target tokens, fp32",
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    _print(res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
