"""The single multilingual model Lego-MT is compared against, at matched compute.

The baseline has the shape of one Lego-MT flow (shared embedding + one encoder + one decoder,
the run's ``model`` section) and trains on every group's pairs together, so it sees every
direction. Matching rule: the same number of optimizer steps as the whole Lego-MT schedule
(:func:`matched_steps`, the sum of every phase's steps), the same pairs per step
(``train.batch_size``), ``max_len``, peak LR, warmup, cosine floor, AdamW settings, grad clip,
seed and initial weights (the Lego-MT run's initial embedding, main encoder and m2m decoder, or
with ``train.init_from`` the multilingual model both start from).
Its one warmup + cosine schedule spans all the steps, where Lego-MT restarts one per phase.

Batches are a pure function of ``(seed, step)`` (:func:`pretrain.lego.data.batch_indices`) and
dropout is reseeded every step, so re-running the command resumes exactly from its latest
checkpoint. The result is ``<run_dir>/flow``, a detached flow that ``lego eval`` and
``pretrain translate`` load like any other.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from checkpoints import Checkpointer, load_checkpoint
from pretrain.lego.data import Pair, batch_indices, collate, load_pairs, read_meta
from pretrain.lego.detach import load_initial_flow, save_flow
from pretrain.lego.parallelize import ADAM_BETAS
from pretrain.lego.train import LegoRunConfig, _Tracker, phases
from pretrain.models.lego_mt import LegoFlow, detach
from pretrain.models.lego_mt.model import flow_loss
from pretrain.trainer.train_module import cosine_with_warmup


def matched_steps(cfg: LegoRunConfig) -> int:
    """Optimizer steps of the whole Lego-MT schedule of ``cfg``: what the baseline gets."""
    return sum(cfg.train.stage1_steps if stage == 1 else cfg.train.stage2_steps for stage, _ in phases(cfg))


def all_pairs(data_dir: Path, groups: list[str]) -> list[Pair]:
    """Every group's pairs in one list (each group holds its sources' pairs to every target, so
    together they cover every direction once)."""
    return [p for g in groups for p in load_pairs(Path(data_dir), g)]


def baseline_config(cfg: LegoRunConfig) -> LegoRunConfig:
    """``cfg`` renamed ``<name>-baseline``, so its MLflow run is told apart from the Lego-MT run."""
    data = cfg.to_dict()
    data["name"] = f"{cfg.name}-baseline"
    if data["tracking"].get("run_name"):
        data["tracking"]["run_name"] = f"{data['tracking']['run_name']}-baseline"
    return LegoRunConfig.from_dict(data)


def _initial_flow(cfg: LegoRunConfig, meta: dict[str, Any]) -> LegoFlow:
    # Same start as the Lego-MT run: its seeded initial state, or the model of train.init_from
    # (then the baseline is that model trained on further, as the paper's fine-tuned M2M-100).
    torch.manual_seed(cfg.train.seed)
    flow = detach(cfg.model.build(resident=[]), encoder="main", decoder="m2m")
    if cfg.train.init_from:
        data_dir = Path(cfg.train.data_dir)
        flow.load_state_dict(
            load_initial_flow(Path(cfg.train.init_from), cfg.model, meta, data_dir).state_dict()
        )
    return flow


def train_baseline(cfg: LegoRunConfig, run_dir: Path, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) the matched baseline of ``cfg`` in ``run_dir``; ``stop_after`` stops
    after that many steps without saving, as if killed. Returns steps, losses and the flow path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    meta = read_meta(Path(tcfg.data_dir), vocab_size=cfg.model.vocab_size)
    total = matched_steps(cfg)
    pairs = all_pairs(Path(tcfg.data_dir), cfg.model.groups)
    device = torch.device(tcfg.device)
    flow = _initial_flow(cfg, meta).to(device).train()
    opt = torch.optim.AdamW(flow.parameters(), lr=tcfg.lr, betas=ADAM_BETAS, weight_decay=tcfg.weight_decay)
    state = Checkpointer(run_dir / "state", keep_last=2)
    step = 0
    latest = state.latest()
    if latest is not None:
        ckpt = load_checkpoint(latest)
        flow.load_state_dict(ckpt.state["model"])
        opt.load_state_dict(ckpt.state["optimizer"])
        step = ckpt.metadata["step"]
    results: dict[str, Any] = {
        "steps": total,
        "batch_size": tcfg.batch_size,
        "pairs": len(pairs),
        "directions": dict(sorted(Counter(f"{p.src_lang}-{p.tgt_lang}" for p in pairs).items())),
        "losses": {},
    }
    tracker = _Tracker(baseline_config(cfg), run_dir)

    def save() -> None:
        state.save(step, {"model": flow.state_dict(), "optimizer": opt.state_dict()}, metadata={"step": step})
        tracker.flush()

    start, t0 = step, time.perf_counter()
    if step == total and (run_dir / "flow").is_dir() and (run_dir / "results.json").is_file():
        tracker.finish()
        return {**json.loads((run_dir / "results.json").read_text()), "losses": {}}
    try:
        while step < total:
            if stop_after is not None and step >= stop_after:
                return results
            idx = batch_indices(len(pairs), tcfg.batch_size, step, tcfg.seed)
            src, tgt_in, labels = (t.to(device) for t in collate([pairs[i] for i in idx], meta, tcfg.max_len))
            lr = tcfg.lr * cosine_with_warmup(
                step, warmup=tcfg.warmup, total=total, min_ratio=tcfg.min_lr_ratio
            )
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(tcfg.seed * 1_000_003 + step)
            opt.zero_grad(set_to_none=True)
            loss = flow_loss(flow(src, tgt_in), labels, cfg.model.pad_id)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(flow.parameters(), tcfg.grad_clip)
            opt.step()
            step += 1
            results["losses"][step] = float(loss.detach())
            tracker.log(step, {"loss": results["losses"][step], "lr": lr})
            if step % tcfg.checkpoint_interval == 0 or step == total:
                save()
        tok = meta.get("tokenizer")
        save_flow(
            flow.eval(), run_dir / "flow", meta=meta, tokenizer=Path(tok) if tok else None, source=run_dir
        )
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    finally:
        tracker.finish()
    results.update(global_step=step, resumed_from=start, flow=str(run_dir / "flow"))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if tracker.client is not None:
        results.update(mlflow_run_id=tracker.run_id, mlflow_tracking_uri=tracker.uri)
    summary = {k: v for k, v in results.items() if k != "losses"}
    summary["final_loss"] = results["losses"][step] if step in results["losses"] else None
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1))
    return results
