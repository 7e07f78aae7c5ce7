"""A checkpoint registry: named, versioned checkpoints in the MLflow model registry.

``register`` verifies a checkpoint, copies it into the registry's store under
``<store>/<name>/<manifest sha256[:16]>/`` (content addressed: training retention can no longer
prune it) and creates an MLflow model version whose ``source`` is that directory. The version is
tagged with the manifest's sha256, the step, the config hash and the stage. ``latest`` always
means the highest version (MLflow reserves it as an alias name); aliases such as ``stable`` are
set on request.

``pull`` copies a version's files into a destination and verifies every file against the manifest
checksums, and the manifest itself against the sha256 recorded at registration: a file changed
in the store since is refused (:class:`~checkpoints.manifest.CheckpointError`).

Model names and aliases are plain names (no separators, no ``..``); paths built from them are
checked to stay inside the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoints.load import verify_checkpoint
from checkpoints.manifest import MANIFEST_NAME, CheckpointError, read_manifest

LATEST_ALIAS = "latest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


def manifest_sha256(ckpt_dir: Path) -> str:
    """The content hash of a checkpoint: sha256 of its ``manifest.json`` (which holds the sha256
    of every other file)."""
    return hashlib.sha256((Path(ckpt_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid registered-model name, else raise ``ValueError``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"model name {name!r}: use letters, digits, '_', '-', '.' (no separators, no '..', "
            "at most 128 characters, starting with a letter or digit)"
        )
    return name


def _check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias) or alias.lower() == LATEST_ALIAS:
        raise ValueError(f"alias {alias!r}: use a letter followed by letters, digits, '_' or '-'")
    return alias


def _inside(root: Path, path: Path) -> Path:
    root_r, path_r = root.resolve(), path.resolve()
    if path_r != root_r and not path_r.is_relative_to(root_r):
        raise ValueError(f"{path} escapes {root}")
    return path


def parse_ref(ref: str) -> tuple[str, str]:
    """``name``, ``name:3`` or ``name:stable`` -> ``(name, "latest" | "3" | "stable")``."""
    name, _, version = ref.partition(":")
    return check_model_name(name), version or LATEST_ALIAS


@dataclass
class ModelVersionInfo:
    """One registered version."""

    name: str
    version: str
    path: Path
    """The checkpoint directory in the store."""
    manifest_sha256: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
            "aliases": self.aliases,
            "tags": self.tags,
            "run_id": self.run_id,
        }


class CheckpointRegistry:
    """Register, list, show and pull checkpoints.

    Args:
        store: Directory that holds the registered checkpoint files.
        tracking_uri: MLflow registry URI; ``None`` means ``sqlite:///<store>/registry.db``.
    """

    def __init__(self, store: str | Path, tracking_uri: str | None = None) -> None:
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or f"sqlite:///{(self.store / 'registry.db').resolve()}"
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # -- writing ----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        ckpt_dir: str | Path,
        *,
        aliases: list[str] | tuple[str, ...] = (),
        run_id: str | None = None,
        description: str | None = None,
    ) -> ModelVersionInfo:
        """Verify ``ckpt_dir``, copy it into the store and create a new version of ``name``.

        Args:
            name: Registered model name.
            ckpt_dir: A checkpoint directory (``step_XXXXXXXX``).
            aliases: Aliases to move to the new version (``latest`` needs none: it is the highest).
            run_id: MLflow run that produced it; default: the run id recorded in the checkpoint's
                lineage or in its run directory's ``mlflow_run_id`` file, if any.
            description: Version description.

        Raises:
            CheckpointError: If the checkpoint does not verify.
            ValueError: For an invalid name or alias.
        """
        from mlflow.exceptions import MlflowException

        check_model_name(name)
        for alias in aliases:
            _check_alias(alias)
        src = Path(ckpt_dir)
        manifest = verify_checkpoint(src)
        digest = manifest_sha256(src)
        dest = _inside(self.store, self.store / name / digest[:16])
        if not (dest.is_dir() and (dest / MANIFEST_NAME).is_file() and manifest_sha256(dest) == digest):
            _copy_checkpoint(src, dest, manifest)
        meta = manifest.get("metadata") or {}
        lineage = meta.get("lineage") or {}
        run_id = run_id or lineage.get("mlflow_run_id") or run_dir_run_id(src)
        tags = {
            "manifest_sha256": digest,
            "step": str(manifest["step"]),
            "config_hash": str(meta.get("config_hash", "")),
            "stage": str(lineage.get("stage", "pretrain")),
            "code_version": str(manifest.get("code_version", "")),
            "registered_from": str(src.resolve()),
        }
        if run_id:  # a tag, not the version's run_id: the run may live in another tracking store
            tags["mlflow_run_id"] = run_id
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        mv = self.client.create_model_version(
            name, source=str(dest.resolve()), tags=tags, description=description
        )
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return self.show(name, str(mv.version))

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(check_model_name(name), _check_alias(alias), str(version))

    # -- reading ----------------------------------------------------------------------------

    def list(self, name: str | None = None) -> list[ModelVersionInfo]:
        """Every version (of ``name``, or of all models), newest first within a model."""
        names = [check_model_name(name)] if name else [m.name for m in self.client.search_registered_models()]
        out = []
        for n in sorted(names):
            by_version: dict[str, list[str]] = {}
            for alias, version in (self.client.get_registered_model(n).aliases or {}).items():
                by_version.setdefault(str(version), []).append(alias)
            versions = self.client.search_model_versions(f"name='{n}'")
            for mv in sorted(versions, key=lambda v: -int(v.version)):
                info = self._info(mv)
                info.aliases = sorted(by_version.get(info.version, []))
                out.append(info)
        return out

    def show(self, name: str, version: str = LATEST_ALIAS) -> ModelVersionInfo:
        """The version ``version`` (a number or an alias) of ``name``."""
        check_model_name(name)
        if str(version).isdigit():
            mv = self.client.get_model_version(name, str(version))
        elif version == LATEST_ALIAS:
            versions = self.client.search_model_versions(f"name='{name}'")
            if not versions:
                raise CheckpointError(f"no registered versions of {name!r}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = self.client.get_model_version_by_alias(name, _check_alias(version))
        return self._info(mv)

    def resolve(self, ref: str) -> ModelVersionInfo:
        """``name[:version|alias]`` -> its version."""
        return self.show(*parse_ref(ref))

    def find_by_manifest(self, digest: str) -> ModelVersionInfo | None:
        """A registered version whose manifest sha256 is ``digest``, if any."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            return None
        found = self.client.search_model_versions(f"tags.manifest_sha256 = '{digest}'")
        return self._info(found[0]) if found else None

    def pull(self, ref: str, dest: str | Path) -> Path:
        """Copy the version ``ref`` (``name[:version|alias]``) into ``dest`` and verify it.

        Every file is checked against the manifest's size and sha256 and the manifest against the
        sha256 recorded at registration. Nothing is left at ``dest`` when verification fails.

        Returns:
            ``dest``.

        Raises:
            CheckpointError: On any mismatch (the file is named) or a missing file.
            FileExistsError: If ``dest`` exists and is not empty.
        """
        info = self.resolve(ref)
        src = _inside(self.store, info.path)
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} exists and is not empty")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-pull-{dest.name}-{secrets.token_hex(4)}"
        try:
            manifest = read_manifest(src)
            _copy_checkpoint(src, tmp, manifest, verify=False)
            actual = manifest_sha256(tmp)
            if actual != info.manifest_sha256:
                raise CheckpointError(
                    f"{src / MANIFEST_NAME}: sha256 {actual[:16]}... differs from the registered "
                    f"{info.manifest_sha256[:16]}... ({info.name} v{info.version}): modified after registration"
                )
            verify_checkpoint(tmp, strict=True)
            if dest.exists():
                dest.rmdir()
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _info(self, mv: Any) -> ModelVersionInfo:
        path = Path(mv.source)
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            path=path,
            manifest_sha256=(mv.tags or {}).get("manifest_sha256", ""),
            aliases=list(getattr(mv, "aliases", []) or []),
            tags=dict(mv.tags or {}),
            run_id=(mv.tags or {}).get("mlflow_run_id") or mv.run_id or None,
        )


def _copy_checkpoint(src: Path, dest: Path, manifest: dict[str, Any], *, verify: bool = True) -> None:
    """Copy the manifest's files (and nothing else) from ``src`` to ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in [*manifest["files"], MANIFEST_NAME]:
            shutil.copyfile(_inside(src, src / name), tmp / name)
        if verify:
            verify_checkpoint(tmp, strict=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_dir_run_id(ckpt_dir: Path) -> str | None:
    """The MLflow run id a training run wrote to ``<run_dir>/mlflow_run_id``, if present."""
    for parent in list(Path(ckpt_dir).resolve().parents)[:2]:
        file = parent / "mlflow_run_id"
        if file.is_file():
            return file.read_text().strip() or None
    return None
