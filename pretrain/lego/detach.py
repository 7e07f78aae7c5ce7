"""Detach one flow from a Lego-MT run: read only the partitions that flow needs.

Any encoder (``main`` or a group's branch) can be paired with any decoder (``m2m`` or a group's
branch). The detached flow is a standalone :class:`~pretrain.models.lego_mt.LegoFlow` saved as an
ordinary checkpoint (part ``model``) with its config, language tags and tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from checkpoints import Checkpointer, load_checkpoint
from pretrain.lego.store import PartitionStore, partition_name
from pretrain.models.lego_mt import LegoFlow, LegoMTConfig


def partition_steps(run_dir: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """``(partition -> step, model config dict)`` of a finished run, else of its latest state."""
    run_dir = Path(run_dir)
    store = PartitionStore(run_dir / "parts")
    if (store.root / "index.json").is_file():
        index = store.read_index()
        return index["partitions"], index["model"]
    latest = Checkpointer(run_dir / "state").latest()
    config = run_dir / "config.json"
    if latest is None or not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a Lego-MT run directory (no parts/index.json)")
    return load_checkpoint(latest, parts=[]).metadata["partitions"], json.loads(config.read_text())["model"]


def detach_from_run(run_dir: Path, *, encoder: str, decoder: str) -> LegoFlow:
    """Build the ``encoder -> decoder`` flow of ``run_dir``, loading only its partitions.

    ``flow.loaded`` lists the ``(partition, part)`` pairs that were read.
    """
    steps, model_cfg = partition_steps(run_dir)
    cfg = LegoMTConfig.from_dict(model_cfg, source=f"{run_dir}/parts/index.json")
    for name, valid in ((encoder, "main"), (decoder, "m2m")):
        if name != valid and name not in cfg.groups:
            raise ValueError(f"{name!r}: use {valid!r} or one of the groups {cfg.groups}")
    store = PartitionStore(Path(run_dir) / "parts")
    flow = LegoFlow(cfg, encoder_name=encoder, decoder_name=decoder)
    shared_parts = ["embed"] + (["main"] if encoder == "main" else []) + (["m2m"] if decoder == "m2m" else [])
    shared = store.load("shared", steps["shared"], parts=shared_parts)
    loaded = [("shared", p) for p in shared_parts]
    flow.embed.load_state_dict(shared["embed"])
    if encoder == "main":
        flow.encoder.load_state_dict(shared["main"])
    else:
        name = partition_name("enc", encoder)
        flow.encoder.load_state_dict(store.load(name, steps[name])["encoder"])
        loaded.append((name, "encoder"))
    if decoder == "m2m":
        flow.decoder.load_state_dict(shared["m2m"])
    else:
        name = partition_name("dec", decoder)
        if name not in steps:
            raise ValueError(f"decoder branch {decoder!r} was never trained (stage 2 did not reach it)")
        flow.decoder.load_state_dict(store.load(name, steps[name])["decoder"])
        loaded.append((name, "decoder"))
    flow.loaded = loaded
    return flow.eval()


def save_flow(
    flow: LegoFlow,
    out_dir: Path,
    *,
    meta: dict[str, Any],
    tokenizer: Path | None = None,
    source: Path | None = None,
) -> Path:
    """Save a detached flow as ``out_dir/step_00000000`` (+ ``latest``); returns that directory.

    ``meta["groups"]`` (group -> languages) is kept so translation can say when a branch is used
    outside its languages; ``source`` (the run it came from) is where its evaluations are
    tracked by default.
    """
    files = {"spm.model": Path(tokenizer)} if tokenizer else None
    metadata = {
        "model": flow.cfg.to_dict(),
        "encoder": flow.encoder_name,
        "decoder": flow.decoder_name,
        "lang_tags": meta["lang_tags"],
        "eos_id": meta["eos_id"],
    }
    if meta.get("groups"):
        metadata["groups"] = meta["groups"]
    if source is not None:
        metadata["run_dir"] = str(Path(source).resolve())
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return Checkpointer(out_dir, keep_last=1).save(
        0, {"model": flow.state_dict()}, metadata=metadata, files=files
    )


def load_flow(path: Path) -> tuple[LegoFlow, dict[str, Any]]:
    """A flow saved by :func:`save_flow` (``path`` = its directory, the checkpoint inside, or a
    baseline run directory holding ``flow/``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such flow directory (write one with `pretrain lego-mt detach`)")
    if (path / "flow").is_dir() and not (path / "manifest.json").is_file():
        path = path / "flow"
    ckpt_dir = Checkpointer(path).latest() if not (path / "manifest.json").is_file() else path
    if ckpt_dir is None:
        raise FileNotFoundError(f"{path}: no detached flow")
    ckpt = load_checkpoint(ckpt_dir)
    md = ckpt.metadata
    flow = LegoFlow(
        LegoMTConfig.from_dict(md["model"]), encoder_name=md["encoder"], decoder_name=md["decoder"]
    )
    flow.load_state_dict(ckpt.state["model"])
    md = {**md, "path": str(ckpt_dir)}
    if (ckpt_dir / "spm.model").is_file():
        md["tokenizer"] = str(ckpt_dir / "spm.model")
    return flow.eval(), md


def load_initial_flow(path: Path, cfg: LegoMTConfig, meta: dict[str, Any], data_dir: Path) -> LegoFlow:
    """The multilingual model ``train.init_from`` names (a flow directory or a baseline run),
    refused with ValueError unless it has ``cfg``'s shape and the language tags and eos of the
    training data's tokenizer (``meta``, read from ``data_dir``)."""
    flow, flow_meta = load_flow(path)
    diff = flow.cfg.shape_diff(cfg)
    if diff:
        raise ValueError(f"train.init_from={path}: model shape differs (theirs, ours): {diff}")
    if (flow_meta.get("lang_tags"), flow_meta.get("eos_id")) != (meta.get("lang_tags"), meta.get("eos_id")):
        raise ValueError(
            f"train.init_from={path}: its tokenizer's language tags/eos differ from "
            f"{data_dir}/meta.json; prepare the data with the model's tokenizer"
        )
    return flow
