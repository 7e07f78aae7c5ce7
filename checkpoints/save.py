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
import logging
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
# .tmp-[old-|del-]step_XXXXXXXX-<host>-<pid>-<random> and .tmp-latest-<host>-<pid>-<random>
_TMP_NAME = re.compile(r"^\.tmp-(?:(old|del)-)?(step_\d+|latest)-(.+)-(\d+)-[0-9a-f]{8}$")

logger = logging.getLogger(__name__)


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
        self._remove_stale_tmp(local_only=True)

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
            metadata: JSON-able data stored in the manifest (as JSON: tuples come back as lists,
                int keys as str).
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
        flat = {}  # everything is checked before anything is written
        for part, value in state.items():
            try:
                flat[part] = flatten_state(value)
            except TypeError as exc:
                raise TypeError(f"checkpoint part {part!r}: {exc}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp(local_only=False)
        final = self.root / f"step_{step:08d}"
        tmp = self._tmp_path(final.name)
        tmp.mkdir()
        try:
            self._write(tmp, step, flat, metadata, files)
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
        self,
        tmp: Path,
        step: int,
        flat: dict[str, tuple[dict[str, torch.Tensor], Any]],
        metadata: dict[str, Any],
        files: dict[str, Path],
    ) -> None:
        skeletons = {part: skeleton for part, (_, skeleton) in flat.items()}
        written: list[str] = []
        for part, (tensors, _) in flat.items():
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
        manifest = build_manifest(step, list(flat), entries, metadata)
        write_json(tmp / MANIFEST_NAME, manifest)
        _fsync_dir(tmp)

    def _install(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():
            old = self._tmp_path(f"old-{final.name}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _write_latest(self, name: str) -> None:
        tmp = self._tmp_path(LATEST_NAME)
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
                trash = self._tmp_path(f"del-{path.name}")
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _tmp_path(self, what: str) -> Path:
        """``root/.tmp-<what>-<host>-<pid>-<random>``: the owner is in the name, see :meth:`_remove_stale_tmp`."""
        return self.root / f"{TMP_PREFIX}{what}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"

    def _remove_stale_tmp(self, *, local_only: bool) -> None:
        """Remove ``.tmp-*`` leftovers of crashed saves.

        Entries made by a live process on this host (other than this one) are never touched. With
        ``local_only`` (a reader constructing a Checkpointer) only entries of dead local processes
        are removed; a save also removes those of other hosts, as one root has one writer. A
        checkpoint moved aside to be replaced whose replacement never arrived is moved back.
        """
        if not self.root.is_dir():
            return
        host = socket.gethostname()
        for path in sorted(self.root.glob(f"{TMP_PREFIX}*")):
            match = _TMP_NAME.match(path.name)
            if match is None:
                continue  # not ours
            kind, name, owner_host, pid = match.group(1, 2, 3, 4)
            if owner_host == host:
                if int(pid) != os.getpid() and _pid_alive(int(pid)):
                    continue
            elif local_only:
                continue
            try:
                if kind == "old" and not (self.root / name).exists() and _is_valid(path):
                    os.rename(path, self.root / name)
                elif path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                logger.warning("could not remove stale %s: %s", path, exc)


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
