"""Loading checkpoints: verify checksums first, then read safetensors and JSON only.

Nothing on this path unpickles: tensors come from ``safetensors.torch.load_file`` and everything
else from ``json``. Files in the directory that the manifest does not list are never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from checkpoints.manifest import (
    MANIFEST_NAME,
    PART_SUFFIX,
    STATE_NAME,
    CheckpointError,
    file_entry,
    read_manifest,
)
from checkpoints.state import unflatten_state

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "verify_checkpoint"]


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint.

    Attributes:
        path: The checkpoint directory.
        step: The step it was saved at.
        state: The requested parts, e.g. ``{"model": {...}, "optimizer": {...}}``.
        metadata: The caller's metadata given to ``Checkpointer.save``.
        manifest: The whole manifest (format version, created, code_version, files, ...).
    """

    path: Path
    step: int
    state: dict[str, Any]
    metadata: dict[str, Any]
    manifest: dict[str, Any]


def verify_checkpoint(path: Path, *, strict: bool = False) -> dict[str, Any]:
    """Check every file listed in the manifest against its byte size and sha256.

    Args:
        path: A checkpoint directory.
        strict: Also fail on files present in the directory but not listed in the manifest.

    Returns:
        The manifest.

    Raises:
        CheckpointError: Naming the file, on a missing or unparseable manifest, a missing file, a
            size or sha256 mismatch, or (with ``strict``) an unlisted file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _verify_files(path, manifest, list(manifest["files"]))
    if strict:
        listed = set(manifest["files"]) | {MANIFEST_NAME}
        extra = sorted(p.name for p in path.iterdir() if p.name not in listed)
        if extra:
            raise CheckpointError(f"{path}: files not listed in the manifest: {', '.join(extra)}")
    return manifest


def load_checkpoint(
    path: Path, *, parts: list[str] | None = None, verify: bool = True, map_location: str = "cpu"
) -> LoadedCheckpoint:
    """Load a checkpoint directory written by ``Checkpointer.save``.

    Args:
        path: The checkpoint directory (e.g. ``Checkpointer.latest()``).
        parts: Load only these parts (default: all). Only their files are verified and read.
        verify: Check sizes and sha256 of the files read before using them.
        map_location: Device the tensors are loaded onto (``"cpu"``, ``"cuda:0"``, ...).

    Returns:
        The :class:`LoadedCheckpoint`.

    Raises:
        CheckpointError: If the checkpoint is incomplete, corrupted, or lacks a requested part.
    """
    path = Path(path)
    manifest = read_manifest(path)
    available = list(manifest["parts"])
    wanted = available if parts is None else list(parts)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise CheckpointError(
            f"{path}: no part(s) {', '.join(map(repr, missing))}; it has {', '.join(available) or 'none'}"
        )
    if verify:
        _verify_files(path, manifest, [STATE_NAME] + [p + PART_SUFFIX for p in wanted])
    skeletons = _read_skeletons(path / STATE_NAME)
    state = {}
    for part in wanted:
        file = path / (part + PART_SUFFIX)
        if part not in skeletons:
            raise CheckpointError(f"{path / STATE_NAME}: no skeleton for part {part!r}")
        try:
            tensors = load_file(file, device=map_location)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({exc})") from None
        try:
            state[part] = unflatten_state(tensors, skeletons[part])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path / STATE_NAME}: part {part!r} does not match {file.name}: {exc}"
            ) from None
    metadata = manifest.get("metadata")
    return LoadedCheckpoint(
        path=path,
        step=manifest["step"],
        state=state,
        metadata=metadata if isinstance(metadata, dict) else {},
        manifest=manifest,
    )


def _verify_files(path: Path, manifest: dict[str, Any], names: list[str]) -> None:
    for name in names:
        file = path / name
        expected = manifest["files"].get(name)
        if expected is None:
            raise CheckpointError(f"{file}: not listed in {path / MANIFEST_NAME}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file}: size is {size} bytes, the manifest says {expected['bytes']} (truncated or modified)"
            )
        actual = file_entry(file)["sha256"]
        if actual != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 mismatch (file is corrupted or modified)")


def _read_skeletons(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be parsed ({exc})") from None
    skeletons = data.get("parts") if isinstance(data, dict) else None
    if not isinstance(skeletons, dict):
        raise CheckpointError(f"{file}: expected an object with 'parts'")
    return skeletons
