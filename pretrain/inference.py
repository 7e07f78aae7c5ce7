"""Loads a trained model for inference from a checkpoint, a checkpoint store or a run directory.
Only safetensors and JSON are read (nothing is unpickled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import Checkpointer
from data_pipeline.tokenizer import SentencePieceTokenizer
from pretrain.models.transnormer import TransNormerLLM


@dataclass
class LoadedModel:
    model: TransNormerLLM
    tokenizer: SentencePieceTokenizer
    checkpoint: Path
    step: int


def resolve_checkpoint(ref: str | Path) -> Path:
    """``ref`` may be a checkpoint directory, a checkpoint store (its latest is taken) or a run
    directory (``<run>/checkpoints``'s latest)."""
    path = Path(ref)
    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            latest = Checkpointer(root).latest()
            if latest is not None:
                return latest
    raise FileNotFoundError(f"no valid checkpoint at {ref} (give a checkpoint, checkpoints or run directory)")


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    from checkpoints.export import load_checkpoint_model

    path = resolve_checkpoint(ref)
    # Builds the recorded model config and merges the LoRA adapters of finetuning stages.
    model, metadata = load_checkpoint_model(path)
    model.to(device).eval()
    tokenizer = SentencePieceTokenizer(path / metadata["tokenizer"]["file"])
    return LoadedModel(model, tokenizer, path, int(metadata.get("step", 0)))
