"""The checkpoint manifest: what a checkpoint directory holds and how to check it.

``manifest.json`` is written last into a checkpoint directory. It records the format version, the
step, when and from which code the checkpoint was made, the caller's metadata, the state parts, and
the sha256 and byte size of every other file. A directory is a checkpoint only if its manifest
exists and parses; the checksums are verified before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
PART_SUFFIX = ".safetensors"
DIST_NAME = "tnl-platform"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or of an unknown format."""


def check_file_name(name: str, what: str) -> str:
    """Return ``name`` if it is a plain file name (no path separators, no ``..``, no leading dot).

    Raises:
        ValueError: Naming ``what`` and the offending name.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not a plain file name: use letters, digits, '_', '-', '.', "
            "no path separators, no '..' and no leading '.'"
        )
    return name


def code_version() -> str:
    """The code that wrote a checkpoint: the git commit of this package's repository (with
    ``+dirty`` when tracked files have uncommitted changes), else ``tnl-platform==<version>``,
    else ``"unknown"``."""
    pkg_dir = Path(__file__).resolve().parent
    try:
        commit = _git(pkg_dir, "rev-parse", "HEAD")
        dirty = _git(pkg_dir, "status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"{DIST_NAME}=={importlib_metadata.version(DIST_NAME)}"
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return out.strip()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of one file: ``{"sha256": hex, "bytes": size}``, read back from disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def build_manifest(
    step: int, parts: list[str], files: dict[str, dict[str, Any]], metadata: dict[str, Any]
) -> dict[str, Any]:
    """Assemble a manifest. ``files`` maps each file name to its :func:`file_entry`."""
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "metadata": metadata,
        "parts": list(parts),
        "files": files,
    }


def write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` and fsync it (NaN/inf allowed, as Python's json reads them)."""
    text = json.dumps(data, indent=indent)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """Read and structurally check ``ckpt_dir/manifest.json`` (checksums are not verified here).

    Raises:
        CheckpointError: If the manifest is missing, unparseable, of an unknown format version, or
            lists an unsafe file name.
    """
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {ckpt_dir} is not a complete checkpoint")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be parsed ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    files, parts, step = manifest.get("files"), manifest.get("parts"), manifest.get("step")
    if not isinstance(files, dict) or not isinstance(parts, list) or type(step) is not int:
        raise CheckpointError(f"{path}: 'step', 'parts' and 'files' are missing or of the wrong type")
    for name, entry in files.items():
        try:
            check_file_name(name, "file")
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if not isinstance(entry, dict) or not {"sha256", "bytes"} <= entry.keys():
            raise CheckpointError(f"{path}: entry for {name!r} lacks 'sha256'/'bytes'")
    for part in parts:
        if not isinstance(part, str) or part + PART_SUFFIX not in files:
            raise CheckpointError(f"{path}: part {part!r} has no file listed in 'files'")
    if STATE_NAME not in files:
        raise CheckpointError(f"{path}: {STATE_NAME} is not listed in 'files'")
    return manifest
