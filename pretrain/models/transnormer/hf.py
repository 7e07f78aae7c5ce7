"""Read and write TransNormerLLM checkpoints in the released Hugging Face directory layout.

A directory holds ``config.json`` (the released ``TransnormerConfig`` key names), the weights as
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (optionally sharded with ``pytorch_model.bin.index.json``), and optionally
the SentencePiece ``tokenizer.model``.

``pytorch_model.bin`` files are read with ``torch.load(weights_only=True, mmap=True)``: only
tensors and plain containers are unpickled, so a crafted pickle cannot run code; anything else
is refused with :class:`HFCheckpointError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pretrain.models.transnormer.config import TransNormerConfig
from pretrain.models.transnormer.model import TransNormerLLM
from pretrain.models.transnormer.state_dict_adapter import (
    HFConfigError,
    TransNormerStateDictAdapter,
    config_from_hf,
    config_to_hf,
)

__all__ = [
    "HFCheckpointError",
    "HFConfigError",
    "config_from_hf",
    "config_to_hf",
    "load_hf",
    "load_hf_config",
    "load_hf_state_dict",
    "save_hf",
]

CONFIG_NAME = "config.json"
SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_NAME = "tokenizer.model"


class HFCheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: missing files, unsafe pickles, wrong weights."""


def load_hf_config(path: str | Path, **overrides: Any) -> TransNormerConfig:
    """Read ``path/config.json`` into a :class:`TransNormerConfig` (see :func:`config_from_hf`)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise HFCheckpointError(f"{file}: not found (expected a Hugging Face checkpoint directory)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object")
    return config_from_hf(hf, **overrides)


def _shard_files(directory: Path, index_name: str) -> list[Path]:
    index = directory / index_name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise HFCheckpointError(f"{index}: not a valid shard index (need a 'weight_map'): {exc}") from None
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name:
            raise HFCheckpointError(f"{index}: shard name {name!r} must be a file name inside {directory}")
        file = directory / name
        if not file.is_file():
            raise HFCheckpointError(f"{index}: shard {name} is missing")
        files.append(file)
    return files


def _load_torch_file(file: Path) -> dict[str, Tensor]:
    """``torch.load`` restricted to tensors (``weights_only``), memory-mapped when the format allows."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (pre-zip) serialization cannot be memory-mapped; still weights_only.
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HFCheckpointError(
            f"{file}: refused: not a plain tensor state dict (loaded with weights_only=True, which "
            f"never runs code from the file): {type(exc).__name__}: {first}"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise HFCheckpointError(f"{file}: expected a flat dict of name -> tensor, got {type(obj).__name__}")
    return obj


def load_hf_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the weights of a checkpoint directory, in HF names, on the CPU.

    Looks for, in order: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` (sharded), ``pytorch_model.bin``.

    Raises:
        HFCheckpointError: If no weights are found, a shard is missing, a tensor name appears in
            two shards, or a ``.bin`` file holds anything but tensors.
    """
    directory = Path(path)
    if (directory / SAFE_INDEX).is_file():
        files, loader = _shard_files(directory, SAFE_INDEX), load_file
    elif (directory / SAFE_NAME).is_file():
        files, loader = [directory / SAFE_NAME], load_file
    elif (directory / BIN_INDEX).is_file():
        files, loader = _shard_files(directory, BIN_INDEX), _load_torch_file
    elif (directory / BIN_NAME).is_file():
        files, loader = [directory / BIN_NAME], _load_torch_file
    else:
        raise HFCheckpointError(
            f"{directory}: no weights found (looked for {SAFE_INDEX}, {SAFE_NAME}, {BIN_INDEX}, {BIN_NAME})"
        )
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            part = loader(file)
        except HFCheckpointError:
            raise
        except Exception as exc:
            raise HFCheckpointError(f"{file}: cannot read safetensors: {exc}") from None
        dup = state.keys() & part.keys()
        if dup:
            raise HFCheckpointError(f"{file}: tensors also stored in an earlier shard: {sorted(dup)[:5]}")
        state.update(part)
    return state


def _check_state(model: TransNormerLLM, state: dict[str, Tensor], directory: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise HFCheckpointError(
            f"{directory}: weights do not match config.json: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s
    ]
    if wrong:
        raise HFCheckpointError(f"{directory}: weight shapes do not match config.json: {wrong[:8]}")


def load_hf(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **config_overrides: Any,
) -> TransNormerLLM:
    """Load a released-layout TransNormerLLM checkpoint directory.

    The model is built on the meta device (no random init of the full weights), materialised on
    ``device`` in ``dtype`` and filled from the checkpoint.

    Args:
        path: The checkpoint directory.
        dtype: Parameter dtype of the returned model (checkpoint tensors are converted).
        device: Where the model lives.
        **config_overrides: :class:`TransNormerConfig` fields absent from ``config.json``
            (for example ``attention_block_size``).

    Returns:
        The model, in eval mode.

    Raises:
        HFConfigError: For configurations this model does not implement (the message names the key).
        HFCheckpointError: For missing, unsafe or mismatched weights.
    """
    directory = Path(path)
    cfg = load_hf_config(directory, **config_overrides)
    adapter = TransNormerStateDictAdapter(cfg)
    try:
        state = adapter.from_hf(load_hf_state_dict(directory))
    except KeyError as exc:
        raise HFCheckpointError(f"{directory}: {exc.args[0]}") from None
    with torch.device("meta"):
        model = cfg.build().to(dtype)  # allocate in the target dtype: no fp32 copy of a bf16 model
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty from meta makes new Parameters, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    _check_state(model, state, directory)
    model.load_state_dict(state, strict=True)  # copies, converting to the parameters' dtype
    return model.eval()


def _weight_files(directory: Path) -> list[Path]:
    patterns = (SAFE_NAME, SAFE_INDEX, "model-*-of-*.safetensors", BIN_NAME, BIN_INDEX, "pytorch_model-*.bin")
    return sorted({f for p in patterns for f in directory.glob(p)})


def _shards(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_hf(
    model: TransNormerLLM,
    path: str | Path,
    *,
    tokenizer_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    **config_extra: Any,
) -> Path:
    """Write ``model`` as a released-layout checkpoint directory.

    Writes ``config.json`` (released key names) and ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` when the
    weights exceed ``max_shard_bytes``. A tied model stores the shared matrix once, as
    ``model.embed_tokens.weight`` (like Hugging Face's ``save_pretrained``).

    Args:
        model: The model to save.
        path: Output directory (created if needed).
        tokenizer_model: A SentencePiece model file to copy in as ``tokenizer.model``.
        dtype: Cast the weights to this dtype (default: keep the model's).
        max_shard_bytes: Split the weights into shards of at most this size (a tensor larger
            than it gets a shard of its own).
        overwrite: Replace weight files already in ``path``; otherwise their presence is an error.
        **config_extra: Extra ``config.json`` keys (``pad_token_id``, ``bos_token_id`` ...).

    Returns:
        The directory.

    Raises:
        HFConfigError: If the config cannot be expressed in the released format.
        FileExistsError: If ``path`` already holds weights and ``overwrite`` is not set.
    """
    directory = Path(path)
    cfg = model.config
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    state = TransNormerStateDictAdapter(cfg).to_hf(state)
    some = next(iter(state.values()))
    hf_cfg = config_to_hf(cfg, torch_dtype=str(some.dtype).removeprefix("torch."), **config_extra)

    directory.mkdir(parents=True, exist_ok=True)
    old = _weight_files(directory)
    if old and not overwrite:
        raise FileExistsError(f"{directory} already holds weights ({old[0].name}); pass overwrite=True")
    for f in old:
        f.unlink()
    metadata = {"format": "pt"}
    shards = _shards(state, max_shard_bytes) if max_shard_bytes else [state]
    if len(shards) == 1:
        save_file(state, directory / SAFE_NAME, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, directory / TOKENIZER_NAME)
    return directory
