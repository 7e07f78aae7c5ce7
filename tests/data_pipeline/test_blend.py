"""Blends resolve to a training config's data.paths/data.weights, check files, and train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.blend import BlendEntry, resolve_blend
from tests.conftest import tiny_config


@pytest.fixture
def shards(tiny_corpus: dict[str, Path], tmp_path: Path) -> Path:
    """The tiny corpus tokenized again as 3 unmerged shards: ``<tmp>/shards/0000{0,1,2}``."""
    from data_pipeline.tokenize import TokenizeConfig, tokenize_parallel

    result = tokenize_parallel(
        [tiny_corpus["raw"]],
        tiny_corpus["tokenizer"],
        tmp_path / "split",
        tasks=3,
        config=TokenizeConfig(merge=False),
    )
    assert len(result["prefixes"]) == 3
    return tmp_path / "split_shards"


def test_blend_resolves_weights(tiny_corpus: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    entries = [
        BlendEntry(path=str(tiny_corpus["prefix"]), weight=3.0),
        BlendEntry(path=f"{shards}/*", weight=1.0),
    ]
    blend = resolve_blend(entries, tokenizer=str(tiny_corpus["tokenizer"]))
    assert blend.paths == [str(tiny_corpus["prefix"])] + [str(shards / f"{r:05d}") for r in range(3)]
    assert sum(blend.weights) == pytest.approx(1.0)
    assert blend.weights[0] == pytest.approx(0.75)
    sizes = [(shards / f"{r:05d}.bin").stat().st_size for r in range(3)]
    assert blend.weights[1:] == pytest.approx([0.25 * s / sum(sizes) for s in sizes])  # shared by size

    path = blend.write_json(tmp_path / "blend.json")
    saved = json.loads(path.read_text())
    assert saved["paths"] == blend.paths and saved["weights"] == blend.weights
    assert saved["overrides"][0].startswith("data.paths=")

    config = blend.apply(tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 2}))
    assert config.data.paths == blend.paths and config.data.weights == blend.weights
    config.data.check_files()

    # the same blend given as --set overrides
    from configs import preset_path
    from pretrain.run_config import RunConfig
    from tests.conftest import tiny_overrides

    again = RunConfig.from_yaml(
        preset_path("tnl-tiny"), tiny_overrides(tiny_corpus, tmp_path / "r2") + blend.overrides()
    )
    assert again.data.paths == blend.paths and again.data.weights == pytest.approx(blend.weights)


def test_single_dataset_blend_trains(tiny_corpus: dict[str, Path], tmp_path: Path) -> None:
    from pretrain.train import run_training

    blend = resolve_blend([BlendEntry(path=str(tiny_corpus["prefix"]), weight=2.0)])
    assert blend.weights == [1.0]
    config = blend.apply(tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 2}))
    assert config.data.paths == blend.paths and config.data.weights is None  # one path: no blending
    assert "data.weights=null" in blend.overrides()
    results = run_training(config, progress=False)
    assert results["final_loss"] is not None and Path(results["checkpoint"]).is_dir()


def test_blended_run_config_trains(tiny_corpus: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    from pretrain.train import run_training

    entries = [BlendEntry(path=str(tiny_corpus["prefix"]), weight=3.0), BlendEntry(path=f"{shards}/*")]
    blend = resolve_blend(entries, tokenizer=str(tiny_corpus["tokenizer"]))
    config = blend.apply(tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 2}))
    results = run_training(config, progress=False)
    assert results["final_loss"] is not None and Path(results["checkpoint"]).is_dir()


def test_blend_errors_name_the_entry(tiny_corpus: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'nowhere/x'.*nowhere/x\.bin"):
        resolve_blend([BlendEntry(path="nowhere/x")])
    with pytest.raises(FileNotFoundError, match=r"no '<prefix>\.idx' matches"):
        resolve_blend([BlendEntry(path=f"{tmp_path}/*")])
    with pytest.raises(ValueError, match="already in the blend"):
        resolve_blend([BlendEntry(path=str(tiny_corpus["prefix"]))] * 2)
    with pytest.raises(ValueError, match="empty"):
        resolve_blend([])
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="weight"):
        BlendEntry.from_dict({"path": "x", "weight": 0}, source="blend.yaml")
