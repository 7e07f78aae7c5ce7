"""The checkpoint registry: versions, aliases, verified pulls, refused tampering and bad names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints import Checkpointer, CheckpointError
from checkpoints.registry import check_model_name, manifest_sha256, parse_ref


def _ckpt(root: Path, step: int, value: float) -> Path:
    return Checkpointer(root).save(
        step, {"model": {"w": torch.full((4,), value)}}, metadata={"config_hash": "x"}
    )


def test_register_list_show_pull(registry, tmp_path: Path) -> None:
    first = registry.register("reg-a", _ckpt(tmp_path / "ck", 1, 1.0))
    second = registry.register("reg-a", _ckpt(tmp_path / "ck", 2, 2.0), aliases=["stable"])
    assert (first.version, second.version) == ("1", "2")
    assert registry.resolve("reg-a").version == "2"  # latest = highest
    assert registry.resolve("reg-a:stable").version == "2"
    assert registry.resolve("reg-a:1").tags["step"] == "1"
    registry.set_alias("reg-a", "stable", 1)
    assert registry.resolve("reg-a:stable").version == "1"
    listed = registry.list("reg-a")
    assert [v.version for v in listed] == ["2", "1"] and listed[1].aliases == ["stable"]
    # Stored in the registry's own store, content addressed: pruning the run's copy is harmless.
    assert first.path.is_relative_to(registry.store.resolve())
    out = registry.pull("reg-a:stable", tmp_path / "pulled")
    assert manifest_sha256(out) == first.manifest_sha256
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "state.json"]
    with pytest.raises(FileExistsError):
        registry.pull("reg-a:1", out)


def test_tampered_store_is_refused(registry, tmp_path: Path) -> None:
    info = registry.register("reg-b", _ckpt(tmp_path / "ck", 1, 1.0))
    weights = info.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        registry.pull("reg-b:1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-pull-*"))


def test_rewritten_manifest_is_refused(registry, tmp_path: Path) -> None:
    info = registry.register("reg-c", _ckpt(tmp_path / "ck", 1, 1.0))
    manifest = info.path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 7'))
    with pytest.raises(CheckpointError, match="modified after registration"):
        registry.pull("reg-c", tmp_path / "out")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "a..b", "", "x" * 200])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_model_name(name)


def test_bad_refs_and_aliases(registry, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_ref("../../etc:1")
    with pytest.raises(ValueError):
        registry.register("reg-d", _ckpt(tmp_path / "ck", 1, 1.0), aliases=["../up"])
