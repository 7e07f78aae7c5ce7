"""Checkpointer.save / load_checkpoint: layout, manifest, latest pointer, retention, config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import (
    FORMAT_VERSION,
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    code_version,
    load_checkpoint,
    verify_checkpoint,
)
from pretrain.config import ConfigError


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.block = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 32, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block(self.embed(ids)))


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return {
        "model": model.state_dict(),
        "trainer": {"step": seed, "tokens_seen": 1000 * seed, "loss_scale": 2.0**16},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }


def test_save_then_load_gives_identical_state_and_metadata(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "ckpts")
    state = small_state(7)
    metadata = {"config": {"model": {"dim": 4}}, "loss": 2.5, "tags": ["a", "b"]}
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"\x00sentencepiece\xff")
    path = ckpt.save(7, state, metadata=metadata, files={"tokenizer.model": tokenizer})

    assert path == tmp_path / "ckpts" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "rng.safetensors",
        "state.json",
        "tokenizer.model",
        "trainer.safetensors",
    ]
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.path == path
    assert loaded.metadata == metadata
    for key, value in state["model"].items():
        assert torch.equal(loaded.state["model"][key], value)
    assert loaded.state["trainer"] == state["trainer"]
    assert torch.equal(loaded.state["rng"]["torch"], state["rng"]["torch"])
    assert loaded.state["rng"]["python"] == state["rng"]["python"]
    assert (path / "tokenizer.model").read_bytes() == tokenizer.read_bytes()

    manifest = loaded.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["code_version"] == code_version() and manifest["code_version"]
    assert manifest["created"]
    assert manifest["parts"] == ["model", "trainer", "rng"]
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert manifest["files"]["tokenizer.model"]["bytes"] == tokenizer.stat().st_size
    assert verify_checkpoint(path) == manifest


def test_load_selected_parts(tmp_path: Path) -> None:
    path = Checkpointer(tmp_path).save(1, small_state(1))
    loaded = load_checkpoint(path, parts=["model"])
    assert list(loaded.state) == ["model"]
    with pytest.raises(CheckpointError, match="'optimizer'"):
        load_checkpoint(path, parts=["optimizer"])


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    path = Checkpointer(tmp_path).save(3, {"model": model.state_dict()})
    state = load_checkpoint(path).state["model"]
    assert state["lm_head.weight"] is state["embed.weight"]

    restored = TiedLM()
    restored.load_state_dict(state)
    assert restored.lm_head.weight is restored.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), restored(ids))


def test_latest_follows_the_newest_and_list_is_ascending(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=10)
    assert ckpt.latest() is None and ckpt.list() == []
    for step in (5, 10, 20):
        path = ckpt.save(step, small_state(step))
        assert ckpt.latest() == path
        assert (tmp_path / "latest").read_text().strip() == path.name
    assert [s for s, _ in ckpt.list()] == [5, 10, 20]

    # A stale or broken pointer falls back to the highest valid step.
    (tmp_path / "latest").write_text("step_00000099\n")
    assert ckpt.latest() == tmp_path / "step_00000020"
    (tmp_path / "latest").write_text("../../etc\n")
    assert ckpt.latest() == tmp_path / "step_00000020"
    # A directory without a manifest is not a checkpoint.
    (tmp_path / "step_00000030").mkdir()
    assert ckpt.latest() == tmp_path / "step_00000020"
    assert [s for s, _ in Checkpointer(tmp_path).list()] == [5, 10, 20]


def test_retention_keeps_last_n_and_every_kth(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 11):
        ckpt.save(step, {"trainer": {"step": step}})
    assert [s for s, _ in ckpt.list()] == [4, 8, 9, 10]
    assert ckpt.latest() == tmp_path / "step_00000010"
    assert not list(tmp_path.glob(".tmp-*"))


def test_retention_never_prunes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(10, {"trainer": {"step": 10}})
    path = ckpt.save(3, {"trainer": {"step": 3}})  # e.g. a rewound run
    assert path.is_dir() and ckpt.latest() == path


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, {"trainer": {"v": 1}}, metadata={"v": 1})
    path = ckpt.save(4, {"trainer": {"v": 2}}, metadata={"v": 2})
    loaded = load_checkpoint(path)
    assert loaded.state["trainer"] == {"v": 2} and loaded.metadata == {"v": 2}
    assert [s for s, _ in ckpt.list()] == [4]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "manifest.json", "state.json"])
def test_bad_extra_file_names_are_rejected(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src.txt"
    src.write_text("x")
    with pytest.raises(ValueError):
        Checkpointer(tmp_path / "c").save(1, {"trainer": {}}, files={name: src})
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="part"):
        ckpt.save(1, {"../model": {}})
    with pytest.raises(ValueError, match="step"):
        ckpt.save(-1, {"trainer": {}})
    with pytest.raises(TypeError, match="metadata"):
        ckpt.save(1, {"trainer": {}}, metadata={"x": object()})
    with pytest.raises(ValueError, match="not a file"):
        ckpt.save(1, {"trainer": {}}, files={"config.yaml": tmp_path / "missing.yaml"})
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    assert ckpt.list() == []


def test_config_validates_and_builds(tmp_path: Path) -> None:
    cfg = CheckpointConfig.from_dict({"interval": 50, "keep_last": 2, "keep_every": 100})
    ckpt = cfg.build(tmp_path / "ckpts")
    assert (ckpt.root, ckpt.keep_last, ckpt.keep_every) == (tmp_path / "ckpts", 2, 100)
    assert cfg.resolve_dir(tmp_path) == tmp_path / "checkpoints"
    assert CheckpointConfig(dir="/x").resolve_dir(tmp_path) == Path("/x")
    assert CheckpointConfig.model_fields["keep_every"].description  # attribute docstrings
    for bad in ({"interval": 0}, {"keep_last": 0}, {"keep_every": -1}, {"intervall": 5}):
        with pytest.raises(ConfigError):
            CheckpointConfig.from_dict(bad)


def test_manifest_is_plain_json(tmp_path: Path) -> None:
    path = Checkpointer(tmp_path).save(2, {"trainer": {"step": 2}}, metadata={"loss": float("nan")})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["metadata"]["loss"] != manifest["metadata"]["loss"]
    json.loads((path / "state.json").read_text())
