"""The ``pretrain`` command line: help on every subcommand, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import build_parser, main

SUBCOMMANDS = ["quickstart", "train", "generate", "config"]


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_for_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    for cmd in [[], *([c] for c in SUBCOMMANDS)]:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*cmd, "--help"])
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS) and "--set" in out and "--prompt" in out


def test_config_typo_fails_before_work_naming_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n")
    proc = _pretrain("train", str(bad), "--set", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "model.n_layer" in proc.stderr and str(bad) in proc.stderr and "model.n_layers" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "train",
            "configs/tnl-tiny.yaml",
            "--set",
            f"data.paths=[{tmp_path}/none]",
            "--set",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "training data not found" in err and f"{tmp_path}/none.bin" in err


def test_config_prints_resolved_yaml_and_reference(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "configs/tnl-tiny.yaml", "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "d_model: 128" in out
    assert main(["config", "--reference"]) == 0
    ref = capsys.readouterr().out
    for key in (
        "`train.lr`",
        "`model.d_model`",
        "`data.paths`",
        "`checkpoint.keep_every`",
        "`parallel.tp`",
        "`tracking.tracking_uri`",
    ):
        assert key in ref


def test_generate_streams_from_a_checkpoint(tiny_corpus: dict[str, Path], tmp_path: Path) -> None:
    from pretrain.generate import SamplingConfig, generate
    from pretrain.inference import load_model
    from pretrain.train import run_training
    from tests.conftest import tiny_config

    run_training(tiny_config(tiny_corpus, tmp_path / "run", **{"train.steps": 2}), progress=False)
    proc = _pretrain(
        "generate", str(tmp_path / "run"), "--prompt", "def main(", "--greedy", "--max-new-tokens", "8"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_model(tmp_path / "run")
    ids = loaded.tokenizer.encode("def main(")
    new = list(
        generate(
            loaded.model,
            ids,
            SamplingConfig(max_new_tokens=8, greedy=True, stop_token_ids=(loaded.tokenizer.eod,)),
        )
    )
    assert proc.stdout.rstrip("\n") == "def main(" + loaded.tokenizer.decode(new)
