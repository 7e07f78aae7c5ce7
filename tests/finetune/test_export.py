"""Export to Hugging Face: ``AutoModelForCausalLM(trust_remote_code=True)`` gives our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import Checkpointer
from checkpoints.export import export_hf, load_checkpoint_model
from pretrain.finetune.lora import LoRAConfig, apply_lora, lora_metadata
from pretrain.models.transnormer import TransNormerConfig

transformers = pytest.importorskip("transformers")


def _save(root: Path, cfg: TransNormerConfig, model: torch.nn.Module, **meta: object) -> Path:
    metadata = {"config": {"model": cfg.to_dict()}, "config_hash": "t", **meta}
    return Checkpointer(root).save(5, {"model": model.state_dict()}, metadata=metadata)


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize(
    "shape",
    [
        {"n_heads": 2, "tie_word_embeddings": False},
        {"n_heads": 3, "d_model": 48, "tie_word_embeddings": True, "lrpe_layers": [0]},
    ],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path: Path, shape: dict) -> None:
    base = {"vocab_size": 96, "d_model": 32, "n_layers": 3, "glu_dim": 48, "attention_block_size": 8}
    cfg = TransNormerConfig(**{**base, **shape})
    torch.manual_seed(0)
    model = cfg.build().eval()
    ckpt = _save(tmp_path / "ck", cfg, model)
    out = export_hf(ckpt, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "modeling_transnormer.py", "lineage.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(out, ids), ours, rtol=1e-4, atol=1e-4)
    # Greedy generation through transformers matches ours token for token.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    prompt = ids[:1, :5]
    generated = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    x = prompt
    with torch.no_grad():
        for _ in range(4):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, x)


def test_lora_checkpoint_exports_merged(tmp_path: Path) -> None:
    cfg = TransNormerConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, glu_dim=32, attention_block_size=8
    )
    torch.manual_seed(0)
    model = cfg.build()
    lcfg = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, lcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    model.eval()
    ckpt = _save(tmp_path / "ck", cfg, model, lora=lora_metadata(lcfg))
    merged, _ = load_checkpoint_model(ckpt)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-4, atol=1e-5)
    out = export_hf(ckpt, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(out, ids), model(ids), rtol=1e-4, atol=1e-5)
