"""Lineage: where a checkpoint comes from, back to the first pretraining run.

A stage checkpoint's manifest metadata holds ``lineage``::

    {"stage": "sft", "data": {...}, "config_hash": "...", "mlflow_run_id": "...",
     "parent": <entry>, "chain": [<parent entry>, <grandparent entry>, ...]}

An entry names a checkpoint by content (``manifest_sha256``, the sha256 of its manifest, which
holds the sha256 of every file) plus its step, stage, data, config hash, MLflow run and how it was
referred to. A pretraining checkpoint has no ``lineage``: it is a root (stage ``pretrain``). The
chain is copied forward at every stage, so ``ckpt lineage`` can print it even where the ancestors'
files are gone; ancestors that are still registered are shown with their registry name.

:func:`resolve_init_from` turns a stage's ``init_from`` into the parent's weights and entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from checkpoints.export import LINEAGE_NAME, load_checkpoint_model
from checkpoints.load import verify_checkpoint
from checkpoints.manifest import CheckpointError, read_manifest
from checkpoints.registry import CheckpointRegistry, manifest_sha256, run_dir_run_id
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.callbacks.base import Callback


@dataclass
class Parent:
    """The checkpoint a stage starts from."""

    model_config: TransNormerConfig
    state: dict[str, Tensor]
    """Plain model weights (LoRA adapters merged)."""
    tokenizer: Path | None
    entry: dict[str, Any]
    chain: list[dict[str, Any]] = field(default_factory=list)
    """The parent entry followed by its ancestors."""


def _data_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    lineage = metadata.get("lineage") or {}
    if lineage.get("data"):
        return lineage["data"]
    data = (metadata.get("config") or {}).get("data") or {}
    return {"kind": "tokens", "paths": data.get("paths"), "seq_len": data.get("seq_len")}


def checkpoint_entry(ckpt_dir: Path, *, ref: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """The lineage entry of a checkpoint directory (its manifest is read, not verified)."""
    path = Path(ckpt_dir)
    manifest = read_manifest(path)
    meta = manifest.get("metadata") or {}
    lineage = meta.get("lineage") or {}
    return {
        "kind": "checkpoint",
        "ref": ref or str(path),
        "path": str(path.resolve()),
        "manifest_sha256": manifest_sha256(path),
        "step": manifest["step"],
        "stage": lineage.get("stage", "pretrain"),
        "config_hash": meta.get("config_hash"),
        "data": _data_summary(meta),
        "mlflow_run_id": lineage.get("mlflow_run_id") or run_id or run_dir_run_id(path),
    }


def checkpoint_chain(ckpt_dir: Path, **entry_kw: Any) -> list[dict[str, Any]]:
    """``[entry of ckpt_dir, parent entry, grandparent entry, ...]``."""
    meta = read_manifest(Path(ckpt_dir)).get("metadata") or {}
    return [checkpoint_entry(ckpt_dir, **entry_kw), *((meta.get("lineage") or {}).get("chain") or [])]


def _hf_chain(directory: Path) -> list[dict[str, Any]]:
    """Entries of a Hugging Face directory: itself (by weight hashes), then, for one exported
    here, the source checkpoint and its chain from ``lineage.json``."""
    digest = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin")):
        digest.update(hashlib.sha256(f.read_bytes()).hexdigest().encode())
    chain: list[dict[str, Any]] = [
        {"kind": "hf", "ref": str(directory), "path": str(directory.resolve()), "weights_sha256": digest.hexdigest(),
         "stage": "export"}
    ]  # fmt: skip
    info_file = directory / LINEAGE_NAME
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        lineage = info.get("lineage") or {}
        chain.append(
            {"kind": "checkpoint", "ref": info.get("source"), "manifest_sha256": info.get("manifest_sha256"),
             "step": info.get("step"), "stage": lineage.get("stage", "pretrain"),
             "config_hash": info.get("config_hash"), "data": lineage.get("data"),
             "mlflow_run_id": lineage.get("mlflow_run_id")}
        )  # fmt: skip
        chain += lineage.get("chain") or []
    return chain


def _is_path_ref(ref: str) -> bool:
    return Path(ref).exists() or "/" in ref or ref.startswith(".")


def _pulled(dest: Path, digest: str) -> bool:
    return (dest / "manifest.json").is_file() and manifest_sha256(dest) == digest


def resolve_checkpoint_ref(
    ref: str, registry: CheckpointRegistry | None, workdir: Path
) -> tuple[Path, dict[str, Any]]:
    """A checkpoint/run/store directory or a registry ref -> ``(verified checkpoint dir, entry kwargs)``.

    A registry ref is pulled (verified) into ``workdir/<name>-v<version>`` once.
    """
    from pretrain.inference import resolve_checkpoint

    if _is_path_ref(ref):
        path = resolve_checkpoint(ref)
        verify_checkpoint(path)
        return path, {"ref": ref}
    if registry is None:
        raise CheckpointError(f"{ref!r} is not a path and no registry is configured")
    info = registry.resolve(ref)
    dest = workdir / f"{info.name}-v{info.version}"
    if not _pulled(dest, info.manifest_sha256):
        try:
            registry.pull(f"{info.name}:{info.version}", dest)
        except (FileExistsError, OSError):
            if not _pulled(dest, info.manifest_sha256):  # else another rank pulled it first
                raise
    verify_checkpoint(dest, strict=True)
    return dest, {"ref": f"{info.name}:{info.version}", "run_id": info.run_id}


def resolve_init_from(ref: str, registry: CheckpointRegistry | None, workdir: Path) -> Parent:
    """Load the parent a stage's ``init_from`` names: a released HF layout directory, a
    checkpoint/run directory, or a registry ref ``name[:version|alias]``."""
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        from pretrain.models.transnormer.hf import load_hf

        model = load_hf(path)
        chain = _hf_chain(path)
        tok = path / "tokenizer.model"
        return Parent(model.config, model.state_dict(), tok if tok.is_file() else None, chain[0], chain)
    ckpt, kw = resolve_checkpoint_ref(ref, registry, workdir)
    model, meta = load_checkpoint_model(ckpt, verify=False)  # verified just above
    tok_name = (meta.get("tokenizer") or {}).get("file", "tokenizer.model")
    tok = ckpt / tok_name
    chain = checkpoint_chain(ckpt, **kw)
    return Parent(model.config, model.state_dict(), tok if tok.is_file() else None, chain[0], chain)


def lineage_chain(ref: str, registry: CheckpointRegistry | None, workdir: Path) -> list[dict[str, Any]]:
    """The chain of ``ref`` (itself first) back to its first pretraining run; entries still in
    the registry get ``registered`` = ``name:version``."""
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        chain = _hf_chain(path)
    else:
        ckpt, kw = resolve_checkpoint_ref(ref, registry, workdir)
        chain = checkpoint_chain(ckpt, **kw)
    if registry is not None:
        for entry in chain:
            found = registry.find_by_manifest(entry.get("manifest_sha256") or "")
            if found is not None:
                entry["registered"] = f"{found.name}:{found.version}"
    return chain


def format_chain(chain: list[dict[str, Any]]) -> str:
    """One line per entry, newest first, indented by generation."""
    lines = []
    for depth, e in enumerate(chain):
        digest = e.get("manifest_sha256") or e.get("weights_sha256") or ""
        data = e.get("data") or {}
        data_text = (
            ", ".join(data.get("files", {}) or []) or ", ".join(map(str, data.get("paths") or [])) or "-"
        )
        parts = [
            f"{'  ' * depth}{'<- ' if depth else ''}{e.get('stage', '?')}",
            f"step={e.get('step', '-')}",
            f"sha256={digest[:16]}",
            f"config={e.get('config_hash') or '-'}",
            f"run={e.get('mlflow_run_id') or '-'}",
            f"data={data_text}",
            f"ref={e.get('registered') or e.get('ref')}",
        ]
        lines.append("  ".join(parts))
    return "\n".join(lines)


class LineageCallback(Callback):
    """Records the stage's MLflow run id in its checkpoints' lineage and links the MLflow run to
    its parent (tags ``parent_run_id``, ``parent_manifest_sha256``, ``stage``, ``init_from``)."""

    priority = 160  # pre_train after MLflowCallback (100) has opened the run

    def __init__(self, lineage: dict[str, Any]) -> None:
        self.lineage = lineage

    def pre_train(self) -> None:
        mlf = self.trainer.callbacks.get("mlflow")
        run_id = getattr(mlf, "run_id", None)
        if run_id is None or not self.trainer.is_main:
            return
        self.lineage["mlflow_run_id"] = run_id
        parent = self.lineage.get("parent") or {}
        tags = {
            "stage": str(self.lineage.get("stage")),
            "init_from": str(parent.get("ref")),
            "parent_manifest_sha256": str(
                parent.get("manifest_sha256") or parent.get("weights_sha256") or ""
            ),
        }
        if parent.get("mlflow_run_id"):
            tags["parent_run_id"] = str(parent["mlflow_run_id"])
        for key, value in tags.items():
            mlf._client.set_tag(run_id, key, value)
