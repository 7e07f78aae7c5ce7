"""Instruction data: x-LLaMA mixture, rotating templates, prompt tokens carry no loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.finetune.config import InstructionDataConfig
from pretrain.finetune.data import InstructionDataset, build_instruction_datasets, encode_example
from pretrain.finetune.instructions import TRANSLATION_TEMPLATES, build_mixture
from pretrain.models.transnormer import TransNormerConfig
from pretrain.trainer.train_module import token_loss


class CharTokenizer:
    eos, pad = 1, 0

    def encode(self, text: str) -> list[int]:
        return [2 + (ord(c) % 60) for c in text]


def write_mixture(root: Path, n: int = 8) -> InstructionDataConfig:
    root.mkdir(parents=True, exist_ok=True)
    en = [
        {"instruction": f"Name a colour number {i}.", "input": "", "output": f"Blue {i}."} for i in range(n)
    ]
    zh = [{"instruction": f"说出颜色 {i}", "input": "", "output": f"蓝色 {i}"} for i in range(n)]
    bi = [{"en": f"The cat sat {i}.", "zh": f"猫坐着 {i}。"} for i in range(n)]
    for name, rows in (("en.jsonl", en), ("zh.jsonl", zh), ("bitext-zh.jsonl", bi)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return InstructionDataConfig(
        english=str(root / "en.jsonl"),
        translated={"zh": str(root / "zh.jsonl")},
        bitext={"zh": str(root / "bitext-zh.jsonl")},
        seq_len=48,
    )


def test_mixture_parts_targets_and_rotating_templates(tmp_path: Path) -> None:
    examples, summary = build_mixture(write_mixture(tmp_path))
    assert summary["counts"] == {"general/en": 8, "translated/zh": 8, "translation/zh": 8}
    assert len(summary["files"]) == 3 and all(len(h) == 64 for h in summary["files"].values())
    translations = [e for e in examples if e.kind == "translation"]
    # The non-English side is always the target; the English side sits in the (masked) prompt.
    assert all("猫" in e.response and "The cat" in e.prompt for e in translations)
    used = {
        t
        for t in TRANSLATION_TEMPLATES
        for e in translations
        if t.format(src="English", tgt="Chinese") in e.prompt
    }
    assert len(used) == len(TRANSLATION_TEMPLATES)


@pytest.mark.parametrize("packing", [True, False])
def test_prompt_positions_carry_no_loss(tmp_path: Path, packing: bool) -> None:
    tok = CharTokenizer()
    examples, _ = build_mixture(write_mixture(tmp_path))
    seq_len = 48 if packing else 256
    ds, _ = build_instruction_datasets(tok, examples, seq_len, packing=packing)
    ids, flags = encode_example(tok, examples[0])
    assert flags[: len(tok.encode(examples[0].prompt))] == [0] * len(tok.encode(examples[0].prompt))
    sample = ds[0]
    assert sample["tokens"].shape == (seq_len,) and sample["loss_mask"].shape == (seq_len,)
    assert 0 < ds.target_tokens < len(ds) * seq_len
    if not packing:  # one example per sample: exactly the response positions carry loss
        n_prompt = len(tok.encode(examples[0].prompt))
        n_resp = len(ids) - n_prompt
        mask = sample["loss_mask"]
        assert mask[: n_prompt - 1].sum() == 0 and mask[n_prompt - 1 : n_prompt - 1 + n_resp].eq(1).all()
        assert mask[n_prompt - 1 + n_resp :].sum() == 0
        assert torch.equal(
            sample["labels"][n_prompt - 1 : n_prompt - 1 + n_resp], torch.tensor(ids[n_prompt:])
        )


def test_gradient_is_unchanged_by_prompt_position_labels(tmp_path: Path) -> None:
    tok = CharTokenizer()
    examples, _ = build_mixture(write_mixture(tmp_path))
    ds, _ = build_instruction_datasets(tok, examples, 48, packing=True)
    batch = [ds[i] for i in range(3)]
    tokens = torch.stack([b["tokens"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    mask = torch.stack([b["loss_mask"] for b in batch])
    assert (mask == 0).any() and (mask == 1).any()
    torch.manual_seed(0)
    model = TransNormerConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, glu_dim=32, attention_block_size=16
    ).build()

    def grads(lbl: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        token_loss(model(tokens), lbl, mask).backward()
        return [p.grad.clone() for p in model.parameters()]

    scrambled = torch.where(mask == 0, torch.randint(0, 64, labels.shape), labels)
    assert not torch.equal(scrambled, labels)
    for a, b in zip(grads(labels), grads(scrambled), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padding_truncates_and_pads() -> None:
    ds = InstructionDataset(
        [([5, 6, 7], [0, 1, 1]), ([5] * 20, [0] * 10 + [1] * 10)], 8, packing=False, pad_id=0
    )
    assert len(ds) == 2
    assert ds[0]["loss_mask"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert ds[1]["tokens"].shape == (8,)
    assert ds[1]["loss_mask"].tolist() == [1] * 8  # last prompt token + start of the response
    short_answer = InstructionDataset([([5] * 20, [0] * 17 + [1] * 3)], 8, packing=False)
    assert short_answer[0]["loss_mask"].tolist() == [0] * 5 + [1] * 3  # the prompt's start goes
