"""Partitioned Lego-MT checkpoints: each part is its own ``checkpoints.Checkpointer`` root.

``<run_dir>/parts/shared`` (parts ``embed``, ``main``, ``m2m``), ``<run_dir>/parts/enc_<group>``
(part ``encoder``) and ``<run_dir>/parts/dec_<group>`` (part ``decoder``). Which step of each
partition is current is recorded by the training state (written last, so it is the commit
point), or, for a finished run, by ``<run_dir>/parts/index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from checkpoints import Checkpointer, load_checkpoint

SHARED_PARTS = ("embed", "main", "m2m")


def partition_name(kind: str, group: str) -> str:
    """``("enc", "de") -> "enc_de"``; ``kind`` is ``enc`` or ``dec``."""
    return f"{kind}_{group}"


class PartitionStore:
    """Saves and loads the model's partitions under ``root`` (``<run_dir>/parts``)."""

    def __init__(self, root: Path, *, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def path(self, name: str, step: int) -> Path:
        return self.root / name / f"step_{step:08d}"

    def save(self, name: str, step: int, state: dict[str, Any], metadata: dict | None = None) -> None:
        Checkpointer(self.root / name, keep_last=self.keep_last).save(step, state, metadata=metadata)

    def load(self, name: str, step: int, parts: list[str] | None = None) -> dict[str, Any]:
        return load_checkpoint(self.path(name, step), parts=parts).state

    def write_index(self, steps: dict[str, int], config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "index.json.tmp"
        tmp.write_text(json.dumps({"partitions": steps, "model": config}, indent=1))
        tmp.replace(self.root / "index.json")

    def read_index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no finished Lego-MT run here")
        return json.loads(path.read_text())


def state_of(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach() for k, v in module.state_dict().items()}
