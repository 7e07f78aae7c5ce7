"""Saving checkpoints: atomic directories, a ``latest`` pointer and retention.

Order of one :meth:`Checkpointer.save` (each step makes the next one safe):
  1. remove stale ``.tmp-*`` directories left by a crashed save;
  2. build everything in ``root/.tmp-step_XXXXXXXX-<host>-<pid>-<random>/``: one
     ``<part>.safetensors`` per state part, ``state.json`` (the skeletons), the extra files, each
     fsync'd, then ``manifest.json`` LAST with the checksums of all the others;
  3. ``os.rename`` it to ``root/step_XXXXXXXX`` (an existing one is first moved aside), fsync ``root``;
  4. replace ``root/latest`` atomically (temporary file + ``os.replace``);
  5. prune by retention: moved aside first, then deleted, so a half-deleted directory never
     looks valid.
A directory named ``step_*`` therefore only ever appears complete.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save_file

from checkpoints.manifest import (
    MANIFEST_NAME,
    PART_SUFFIX,
    STATE_NAME,
    CheckpointError,
    build_manifest,
    check_file_name,
    file_entry,
    read_manifest,
    write_json,
)
from checkpoints.state import flatten_state
from pretrain.config import Config

LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointConfig(Config):
    """Where and how often to save checkpoints, and which ones to keep."""

    dir: str | None = None
    """Checkpoint directory; ``None`` means ``<run dir>/checkpoints`` (see :meth:`resolve_dir`)."""
    interval: int = Field(default=100, gt=0)
    """Save every this many optimizer steps, plus a final save at the end of training."""
    keep_last: int = Field(default=3, ge=1)
    """Keep the checkpoints of this many highest steps."""
    keep_every: int = Field(default=0, ge=0)
    """Also keep every checkpoint whose step is a multiple of this, forever (0 = off)."""

    def resolve_dir(self, run_dir: Path) -> Path:
        """The checkpoint directory: ``dir`` if set, else ``run_dir/checkpoints``."""
        return Path(self.dir) if self.dir is not None else Path(run_dir) / "checkpoints"

    def build(self, root: Path) -> Checkpointer:
        """Make a :class:`Checkpointer` writing to ``root``, the already resolved checkpoint directory."""
        return Checkpointer(root, keep_last=self.keep_last, keep_every=self.keep_every)


class Checkpointer:
    """Saves named state parts under ``root/step_XXXXXXXX/`` and finds valid checkpoints.

    One process (rank 0) writes to a given ``root``. Other processes may read concurrently.

    Args:
        root: Directory holding the ``step_*`` checkpoints and the ``latest`` pointer.
        keep_last: Keep the checkpoints of this many highest steps (>= 1).
        keep_every: Also keep every step that is a multiple of this (0 = off).
    """

    def __init__(self, root: Path, *, keep_last: int = 3, keep_every: int = 0) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every < 0:
            raise ValueError(f"keep_every must be >= 0 (0 = off), got {keep_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()

    def save(
        self,
        step: int,
        state: dict[str, Any],
        *,
        metadata: dict[str, Any] | None = None,
        files: dict[str, Path] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step`` and make it the ``latest``.

        Args:
            step: Optimizer step (>= 0). Saving an existing step replaces it.
            state: Named parts, e.g. ``{"model": model.state_dict(), "optimizer": ..., "rng": ...}``;
                each becomes ``<part>.safetensors`` plus its skeleton in ``state.json``.
            metadata: JSON-able data stored in the manifest (tuples come back as lists).
            files: Extra files copied in under the given names (e.g. ``{"config.yaml": path}``).

        Returns:
            The checkpoint directory ``root/step_XXXXXXXX``.

        Raises:
            ValueError: For a bad step, part name or file name, or a missing extra file.
            TypeError: For state of an unsupported type (the path is named) or non-JSON metadata.
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        files = dict(files or {})
        metadata = dict(metadata or {})
        self._check_names(state, files)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be JSON-serialisable: {exc}") from None
        self._remove_stale_tmp()
        final = self.root / f"step_{step:08d}"
        tmp = (
            self.root
            / f"{TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        tmp.mkdir()
        try:
            self._write(tmp, step, state, metadata, files)
            self._install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._write_latest(final.name)
        self._prune(keep=final)
        return final

    def latest(self) -> Path | None:
        """The checkpoint named by ``root/latest`` if valid, else the highest-step valid one, else ``None``."""
        pointer = self.root / LATEST_NAME
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_DIR.match(name) and _is_valid(self.root / name):
            return self.root / name
        found = self.list()
        return found[-1][1] if found else None

    def list(self) -> list[tuple[int, Path]]:
        """Valid checkpoints (manifest present and parseable) as ``(step, path)``, ascending by step."""
        out = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            match = _STEP_DIR.match(path.name)
            if match and _is_valid(path):
                out.append((int(match.group(1)), path))
        return sorted(out)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_names(state: dict[str, Any], files: dict[str, Path]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of named parts, got {type(state).__name__}")
        reserved = {MANIFEST_NAME, STATE_NAME}
        for part in state:
            check_file_name(part, "state part")
        for name, src in files.items():
            check_file_name(name, "extra file")
            if name in reserved or name in {p + PART_SUFFIX for p in state}:
                raise ValueError(f"extra file {name!r} clashes with a file the checkpoint writes itself")
            if not Path(src).is_file():
                raise ValueError(f"extra file {name!r}: {src} is not a file")

    def _write(
        self, tmp: Path, step: int, state: dict[str, Any], metadata: dict[str, Any], files: dict[str, Path]
    ) -> None:
        skeletons: dict[str, Any] = {}
        written: list[str] = []
        for part, value in state.items():
            tensors, skeletons[part] = flatten_state(value)
            name = part + PART_SUFFIX
            save_file(_independent(tensors), tmp / name, metadata={"format": "pt"})
            _fsync_file(tmp / name)
            written.append(name)
        write_json(tmp / STATE_NAME, {"parts": skeletons}, indent=None)
        written.append(STATE_NAME)
        for name, src in files.items():
            shutil.copyfile(src, tmp / name)
            _fsync_file(tmp / name)
            written.append(name)
        entries = {name: file_entry(tmp / name) for name in written}
        manifest = build_manifest(step, list(state), entries, metadata)
        write_json(tmp / MANIFEST_NAME, manifest)
        _fsync_dir(tmp)

    def _install(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():
            old = self.root / f"{TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f"{TMP_PREFIX}{LATEST_NAME}-{secrets.token_hex(4)}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST_NAME)
        _fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        found = self.list()
        kept = {path for _, path in found[-self.keep_last :]} | {keep}
        if self.keep_every > 0:
            kept |= {path for step, path in found if step % self.keep_every == 0}
        for _, path in found:
            if path not in kept:
                trash = self.root / f"{TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        """Remove ``.tmp-*`` leftovers, except those of a live save by another local process.

        A checkpoint moved aside to be replaced (``.tmp-old-step_X-*``) whose replacement never
        arrived is moved back instead.
        """
        host = socket.gethostname()
        for path in sorted(self.root.glob(f"{TMP_PREFIX}*")):
            owner = _tmp_owner(path.name, host)
            if owner is not None and owner != os.getpid() and _pid_alive(owner):
                continue
            old = re.match(rf"^{re.escape(TMP_PREFIX)}old-(step_\d+)-[0-9a-f]+$", path.name)
            if old and not (self.root / old.group(1)).exists() and _is_valid(path):
                os.rename(path, self.root / old.group(1))
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _independent(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make every tensor contiguous and the sole user of its storage, as safetensors requires.

    Only tensors that share memory with another one or view part of a larger storage are copied.
    """
    out = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, t in tensors.items():
        t = t.contiguous()
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        partial = storage.nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0
        if t.numel() > 0 and (partial or key in seen):
            t = t.clone()
        seen.add((t.device, t.untyped_storage().data_ptr()))
        out[name] = t
    return out


def _tmp_owner(name: str, host: str) -> int | None:
    """The pid in a save's temporary directory name if it was made on ``host``, else ``None``."""
    match = re.match(rf"^{re.escape(TMP_PREFIX)}step_\d+-(.+)-(\d+)-[0-9a-f]+$", name)
    if match and match.group(1) == host:
        return int(match.group(2))
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_valid(path: Path) -> bool:
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
