"""Run configs: presets load, overrides apply, and every mistake names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import PRESET_DIR, preset_path
from parallel.config import ParallelConfig
from pretrain.config import ConfigError, apply_overrides
from pretrain.run_config import RunConfig


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("tnl-*.yaml")))
def test_every_preset_loads(preset: str) -> None:
    config = RunConfig.from_yaml(preset_path(preset))
    assert config.name == preset
    assert config.model.num_params() > 0


def test_published_presets_have_published_sizes() -> None:
    # Released shapes (REFERENCE.md section 1): layers x width x heads.
    shapes = {
        "385m": (24, 1024, 8),
        "1b": (16, 2048, 16),
        "3b": (32, 2560, 20),
        "7b": (30, 4096, 32),
        "13b": (36, 5120, 40),
        "15b": (42, 5120, 40),
    }
    for name, (layers, width, heads) in shapes.items():
        m = RunConfig.from_yaml(preset_path(f"tnl-{name}")).model
        assert (m.n_layers, m.d_model, m.n_heads, m.vocab_size) == (layers, width, heads, 64000)
    assert RunConfig.from_yaml(preset_path("tnl-15b")).model.lrpe_layers == [0]


def test_overrides_parse_values_as_yaml() -> None:
    config = RunConfig.from_yaml(
        preset_path("tnl-tiny"), ["train.lr=1e-4", "data.paths=[a, b]", "train.steps=7"]
    )
    assert config.train.lr == 1e-4 and config.train.steps == 7 and config.data.paths == ["a", "b"]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  lr: 1e-3\n  stpes: 10\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    msg = str(err.value)
    assert str(path) in msg and "train.stpes" in msg and "did you mean 'train.steps'" in msg


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  d_model: wide\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    assert "model.d_model" in str(err.value) and "'wide'" in str(err.value) and str(path) in str(err.value)


def test_invalid_value_explains_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(_write(tmp_path, "model:\n  d_model: 100\n  n_heads: 3\n"))
    assert "n_heads=3 must divide" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.steps"):
        RunConfig.from_yaml(preset_path("tnl-tiny"), ["train.steps=0"])


def test_override_typo_is_named_with_the_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(preset_path("tnl-tiny"), ["trian.lr=1"])
    assert "trian" in str(err.value) and "--set trian.lr=1" in str(err.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        RunConfig.from_yaml(preset_path("tnl-tiny"), ["train.lr"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_resolved_config_round_trips() -> None:
    config = RunConfig.from_yaml(preset_path("tnl-7b"))
    again = RunConfig.from_dict(config.to_dict())
    assert again == config and again.config_hash() == config.config_hash()


def test_parallel_degree_arithmetic() -> None:
    p = ParallelConfig(tp=2, pp=2)
    assert p.dp_for(8) == 2
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp = 4"):
        p.dp_for(6)
    with pytest.raises(ValueError, match="ZeRO-2/3 with pipeline"):
        ParallelConfig(pp=2, zero_stage=3, engine="deepspeed")
