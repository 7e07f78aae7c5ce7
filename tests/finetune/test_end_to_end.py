"""Pretrain -> register -> pull -> instruction-tune (masked prompts) -> export -> transformers.

One tiny TransNormerLLM goes through every step; lineage shows them all and a tampered pull is
refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import CheckpointError, load_checkpoint
from checkpoints.export import export_hf, load_checkpoint_model
from checkpoints.registry import manifest_sha256
from pretrain.finetune.config import StageConfig
from pretrain.finetune.lineage import format_chain, lineage_chain
from pretrain.finetune.run import run_stage
from pretrain.train import run_training
from tests.conftest import tiny_config
from tests.finetune.test_sft_data import write_mixture

transformers = pytest.importorskip("transformers")


def test_pretrain_register_pull_sft_export_lineage(tiny_corpus, registry, tmp_path: Path) -> None:
    uri = registry.tracking_uri
    pre = run_training(
        tiny_config(tiny_corpus, tmp_path / "pre", **{"train.steps": 4, "tracking.enabled": True,
                                                      "tracking.tracking_uri": uri}),
        progress=False,
    )  # fmt: skip
    pre_ckpt = Path(pre["checkpoint"])
    info = registry.register("e2e-tiny", pre_ckpt, aliases=["stable"])
    assert info.run_id == pre["mlflow_run_id"]

    mixture = write_mixture(tmp_path / "mix", n=12).model_dump()
    mixture.update(seq_len=32, eval_examples=4)
    stage = StageConfig.from_dict(
        {
            "name": "sft",
            "run_dir": str(tmp_path / "sft"),
            "init_from": "e2e-tiny:stable",
            "stage": "sft",
            "registry": {"store": str(registry.store), "tracking_uri": uri},
            "instructions": mixture,
            "attention_block_size": 8,
            "train": {"steps": 3, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.0,
                      "log_interval": 1, "eval_interval": 0, "eval_batches": 1, "threads": 1},
            "checkpoint": {"interval": 100},
            "tracking": {"tracking_uri": uri, "experiment": "finetune"},
        }
    )  # fmt: skip
    out = run_stage(stage, progress=False)
    sft_ckpt = Path(out["checkpoint"])
    meta = load_checkpoint(sft_ckpt, parts=[]).metadata
    lineage = meta["lineage"]
    assert lineage["stage"] == "sft" and lineage["parent"]["manifest_sha256"] == info.manifest_sha256
    assert lineage["parent"]["ref"] == "e2e-tiny:1" and lineage["data"]["counts"]["translation/zh"] > 0
    assert lineage["mlflow_run_id"] == out["mlflow_run_id"]
    # The parent was pulled (verified) and its weights are where the stage started from.
    parent_model, _ = load_checkpoint_model(tmp_path / "sft" / "parent" / "e2e-tiny-v1")
    pre_model, _ = load_checkpoint_model(pre_ckpt)
    for a, b in zip(parent_model.state_dict().values(), pre_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    tuned, _ = load_checkpoint_model(sft_ckpt)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), pre_model.parameters(), strict=True))
    # MLflow: the stage's run links its parent run.
    run = registry.client.get_run(out["mlflow_run_id"])
    assert run.data.tags["parent_run_id"] == pre["mlflow_run_id"]
    assert run.data.tags["parent_manifest_sha256"] == info.manifest_sha256

    sft_info = registry.register("e2e-tiny-sft", sft_ckpt)
    export = export_hf(sft_ckpt, tmp_path / "hf", source_ref="e2e-tiny-sft:1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export, trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, tuned(ids), rtol=1e-4, atol=1e-4)
    assert (export / "tokenizer.model").is_file()

    chain = lineage_chain(str(export), registry, tmp_path / "work")
    assert [e["stage"] for e in chain] == ["export", "sft", "pretrain"]
    assert chain[1]["manifest_sha256"] == sft_info.manifest_sha256 == manifest_sha256(sft_ckpt)
    assert chain[2]["registered"] == "e2e-tiny:1" and chain[2]["mlflow_run_id"] == pre["mlflow_run_id"]
    text = format_chain(chain)
    assert "sft" in text and "pretrain" in text
    reg_chain = lineage_chain("e2e-tiny-sft", registry, tmp_path / "work")
    assert [e["stage"] for e in reg_chain] == ["sft", "pretrain"]
    assert json.loads((export / "lineage.json").read_text())["manifest_sha256"] == sft_info.manifest_sha256

    # Tampering with the registered parent is caught on the next pull.
    weights = info.path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError):
        registry.pull("e2e-tiny:stable", tmp_path / "again")
