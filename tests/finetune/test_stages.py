"""Continued pretraining from a run directory; LoRA SFT from a released-layout HF directory with
the ``sft-tiny`` preset; resuming a stage; the ``ckpt`` and ``finetune`` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from checkpoints import Checkpointer, load_checkpoint
from checkpoints.export import export_hf, load_checkpoint_model
from configs import preset_path
from pretrain.finetune.cli import add_finetune_commands
from pretrain.finetune.config import StageConfig
from pretrain.finetune.lineage import lineage_chain
from pretrain.finetune.run import run_stage
from pretrain.models.transnormer import TransNormerConfig
from pretrain.train import run_training
from tests.conftest import tiny_config
from tests.finetune.test_sft_data import write_mixture

TRAIN = {
    "micro_batch_size": 2,
    "warmup_steps": 1,
    "log_interval": 1,
    "eval_interval": 0,
    "eval_batches": 1,
    "threads": 1,
}


@pytest.fixture(scope="module")
def pretrained(tiny_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pre")
    run_training(tiny_config(tiny_corpus, run_dir, **{"train.steps": 2}), progress=False)
    return run_dir


def test_continued_pretraining_from_run_dir_other_seq_len(
    tiny_corpus, pretrained: Path, tmp_path: Path
) -> None:
    stage = StageConfig.from_dict(
        {
            "name": "cont",
            "run_dir": str(tmp_path / "cont"),
            "init_from": str(pretrained),
            "stage": "continued",
            "data": {
                "paths": [str(tiny_corpus["prefix"])],
                "tokenizer": str(tiny_corpus["tokenizer"]),
                "seq_len": 32,
            },
            "train": {**TRAIN, "steps": 2},
            "tracking": {"enabled": False},
        }
    )
    out = run_stage(stage, progress=False)
    meta = load_checkpoint(Path(out["checkpoint"]), parts=[]).metadata
    assert meta["lineage"]["stage"] == "continued" and meta["config"]["data"]["seq_len"] == 32
    assert out["peak_memory_gib"] > 0  # stages record their peak memory like pretraining runs
    assert [e["stage"] for e in lineage_chain(out["checkpoint"], None, tmp_path)] == ["continued", "pretrain"]
    # A re-run resumes the stage from its own checkpoint (no work left at max_steps).
    again = run_stage(
        stage.model_copy(update={"train": stage.train.model_copy(update={"steps": 3})}), progress=False
    )
    assert again["resumed_from_step"] == 2


def test_lora_stage_from_hf_dir_with_preset(pretrained: Path, tmp_path: Path) -> None:
    hf_dir = export_hf(Checkpointer(pretrained / "checkpoints").latest(), tmp_path / "hf")
    mix = write_mixture(tmp_path / "mix")
    overrides = [
        "name=lora",
        f"run_dir={tmp_path / 'lora'}",
        f"init_from={hf_dir}",
        "stage=lora",
        f"instructions.english={mix.english}",
        f"instructions.translated.zh={mix.translated['zh']}",
        f"instructions.bitext.zh={mix.bitext['zh']}",
        "instructions.seq_len=32",
        "instructions.packing=false",
        "instructions.eval_examples=2",
        "lora.rank=2",
        "train.steps=2",
        "train.micro_batch_size=2",
        "train.threads=1",
        "tracking.enabled=false",
    ]
    stage = StageConfig.from_yaml(preset_path("sft-tiny"), overrides)
    out = run_stage(stage, progress=False)
    ckpt = Path(out["checkpoint"])
    loaded = load_checkpoint(ckpt, parts=["model"])
    assert loaded.metadata["lora"]["rank"] == 2 and any(k.endswith("lora_A") for k in loaded.state["model"])
    # Only the adapters trained: merged weights differ from the parent only through B @ A.
    merged, _ = load_checkpoint_model(ckpt)
    base = TransNormerConfig.from_dict(loaded.metadata["config"]["model"]).build()
    assert merged.state_dict().keys() == base.state_dict().keys()
    frozen = {k: v for k, v in loaded.state["model"].items() if "lora_" not in k}
    parent, _ = load_checkpoint_model(Checkpointer(pretrained / "checkpoints").latest())
    assert all(torch.equal(frozen[k], parent.state_dict()[k]) for k in frozen)
    chain = lineage_chain(str(ckpt), None, tmp_path)
    assert [e["stage"] for e in chain] == ["lora", "export", "pretrain"]


def test_ckpt_commands(registry, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = TransNormerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, glu_dim=32)
    ckpt = Checkpointer(tmp_path / "ck").save(
        1,
        {"model": cfg.build().state_dict()},
        metadata={"config": {"model": cfg.to_dict()}, "config_hash": "h"},
    )
    parser = argparse.ArgumentParser()
    add_finetune_commands(parser.add_subparsers(dest="command"))
    reg = ["--registry", str(registry.store), "--tracking-uri", registry.tracking_uri]

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.handler(args)

    assert run("ckpt", "register", "cli-m", str(tmp_path / "ck"), "--alias", "stable", *reg) == 0
    assert run("ckpt", "list", "cli-m", *reg) == 0
    assert "cli-m:1 [stable]" in capsys.readouterr().out
    assert run("ckpt", "show", "cli-m:stable", *reg) == 0
    assert '"version": "1"' in capsys.readouterr().out
    assert run("ckpt", "pull", "cli-m", str(tmp_path / "pulled"), *reg) == 0
    assert run("ckpt", "export", "cli-m:1", str(tmp_path / "hf"), *reg) == 0
    assert (tmp_path / "hf" / "modeling_transnormer.py").is_file()
    assert run("ckpt", "lineage", str(tmp_path / "hf"), *reg) == 0
    out = capsys.readouterr().out
    assert "export" in out and "pretrain" in out and "cli-m:1" in out
    assert run("ckpt", "register", "../evil", str(ckpt), *reg) == 2
    assert run("ckpt", "pull", "cli-m", str(tmp_path / "pulled"), *reg) == 2  # not empty
