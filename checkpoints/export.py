"""Export a checkpoint as a Hugging Face model directory that downstream teams can load.

The directory holds the released TransNormerLLM layout written by
:func:`pretrain.models.transnormer.hf.save_hf` (``config.json`` + ``model.safetensors``), the
SentencePiece ``tokenizer.model``, the modeling code from :mod:`checkpoints.hf_modeling`
(``config.json``'s ``auto_map`` points at it) and ``lineage.json`` (the source checkpoint's
manifest sha256 and its lineage), so that::

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

gives the same logits as :class:`~pretrain.models.transnormer.TransNormerLLM`.

State-dict adapters on the way out: a LoRA checkpoint's adapters are merged into the weights
(:func:`pretrain.finetune.lora.merge_lora_state`), and a tied model stores its embedding once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from checkpoints.load import load_checkpoint
from checkpoints.manifest import CheckpointError

MODELING_DIR = Path(__file__).resolve().parent / "hf_modeling"
MODELING_FILES = ("configuration_transnormer.py", "modeling_transnormer.py")
AUTO_MAP = {
    "AutoConfig": "configuration_transnormer.TransnormerConfig",
    "AutoModel": "modeling_transnormer.TransnormerModel",
    "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
}
LINEAGE_NAME = "lineage.json"


def load_checkpoint_model(ckpt_dir: str | Path, *, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights (LoRA adapters merged).

    Returns:
        ``(model in eval mode on the CPU, manifest metadata)``.

    Raises:
        CheckpointError: If the checkpoint does not verify or records no model config.
    """
    from pretrain.finetune.lora import merge_lora_state
    from pretrain.models.transnormer import TransNormerConfig

    path = Path(ckpt_dir)
    loaded = load_checkpoint(path, parts=["model"], verify=verify)
    try:
        model_dict = loaded.metadata["config"]["model"]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{path}: the manifest records no model config (metadata.config.model)"
        ) from None
    cfg = TransNormerConfig.from_dict(model_dict, source=str(path / "manifest.json"))
    state = loaded.state["model"]
    lora = loaded.metadata.get("lora")
    if lora:
        state = merge_lora_state(state, float(lora["scale"]))
    model = cfg.build()
    model.load_state_dict(state)
    return model.eval(), loaded.metadata


def export_hf(
    ckpt_dir: str | Path,
    dest: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    source_ref: str | None = None,
) -> Path:
    """Write the checkpoint ``ckpt_dir`` as a Hugging Face directory ``dest``.

    Args:
        ckpt_dir: A verified checkpoint directory.
        dest: Output directory.
        dtype: Cast the weights (default: as trained, fp32).
        overwrite: Replace weights already in ``dest``.
        source_ref: How the checkpoint was named (registry ref or path), recorded in ``lineage.json``.

    Returns:
        ``dest``.
    """
    from checkpoints.registry import manifest_sha256
    from data_pipeline.tokenizer import SentencePieceTokenizer
    from pretrain.models.transnormer.hf import save_hf

    src = Path(ckpt_dir)
    model, metadata = load_checkpoint_model(src)
    tok_name = (metadata.get("tokenizer") or {}).get("file", "tokenizer.model")
    tok_file = src / tok_name
    extra: dict[str, Any] = {"auto_map": AUTO_MAP, "use_cache": False}
    if tok_file.is_file():
        tok = SentencePieceTokenizer(tok_file)
        extra.update(bos_token_id=tok.bos, eos_token_id=tok.eos, pad_token_id=max(tok.pad, 0))
    out = save_hf(model, dest, tokenizer_model=tok_file if tok_file.is_file() else None, dtype=dtype,
                  overwrite=overwrite, **extra)  # fmt: skip
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, out / name)
    lineage = {
        "source": source_ref or str(src),
        "manifest_sha256": manifest_sha256(src),
        "step": load_checkpoint(src, parts=[], verify=False).step,
        "lineage": metadata.get("lineage") or {"stage": "pretrain", "chain": []},
        "config_hash": metadata.get("config_hash"),
    }
    (out / LINEAGE_NAME).write_text(json.dumps(lineage, indent=2) + "\n")
    return out
