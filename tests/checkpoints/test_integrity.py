"""Corrupted or tampered checkpoints are detected before use; loading never unpickles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from checkpoints import Checkpointer, CheckpointError, load_checkpoint, verify_checkpoint


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "trainer": {"step": 5}}
    return Checkpointer(tmp_path / "ckpts").save(5, state, metadata={"note": "ok"})


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_tensor_data_is_detected(ckpt_dir: Path) -> None:
    file = ckpt_dir / "model.safetensors"
    flip_byte(file, file.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch"):
        load_checkpoint(ckpt_dir)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        verify_checkpoint(ckpt_dir)
    # A part that was not tampered with can still be loaded on its own.
    assert load_checkpoint(ckpt_dir, parts=["trainer"]).state["trainer"] == {"step": 5}


def test_truncated_file_is_detected(ckpt_dir: Path) -> None:
    file = ckpt_dir / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: size is \d+ bytes"):
        load_checkpoint(ckpt_dir)


def test_missing_file_is_detected(ckpt_dir: Path) -> None:
    (ckpt_dir / "trainer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"trainer\.safetensors: missing"):
        load_checkpoint(ckpt_dir)


def test_tampered_state_json_is_detected(ckpt_dir: Path) -> None:
    file = ckpt_dir / "state.json"
    file.write_text(file.read_text().replace('"step": 5', '"step": 6'))
    with pytest.raises(CheckpointError, match=r"state\.json"):
        load_checkpoint(ckpt_dir)


def test_broken_manifest_is_not_a_checkpoint(ckpt_dir: Path) -> None:
    manifest = ckpt_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointError, match=r"manifest\.json: cannot be parsed"):
        load_checkpoint(ckpt_dir)
    ckpt = Checkpointer(ckpt_dir.parent)
    assert ckpt.list() == [] and ckpt.latest() is None
    manifest.unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        verify_checkpoint(ckpt_dir)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/dir.bin"])
def test_manifest_cannot_point_outside_the_directory(ckpt_dir: Path, name: str) -> None:
    path = ckpt_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 0}
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        verify_checkpoint(ckpt_dir)


def test_unknown_format_version_is_rejected(ckpt_dir: Path) -> None:
    path = ckpt_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(ckpt_dir)


def test_strict_verify_rejects_unlisted_files(ckpt_dir: Path) -> None:
    (ckpt_dir / "notes.txt").write_text("hi")
    verify_checkpoint(ckpt_dir)
    with pytest.raises(CheckpointError, match=r"notes\.txt"):
        verify_checkpoint(ckpt_dir, strict=True)


class _Payload:
    """Unpickling this creates ``marker``: proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_loading_never_unpickles(ckpt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "unpickled"
    for name in ("model.pt", "optimizer.pt", "trainer.pkl", "rng.bin"):
        (ckpt_dir / name).write_bytes(pickle.dumps(_Payload(marker)))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load path must not unpickle")

    for module, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, attr, forbidden)

    loaded = load_checkpoint(ckpt_dir)
    verify_checkpoint(ckpt_dir)
    Checkpointer(ckpt_dir.parent).latest()
    assert loaded.metadata == {"note": "ok"} and set(loaded.state) == {"model", "trainer"}
    assert not marker.exists()
