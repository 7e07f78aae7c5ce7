"""A local metrics log: one JSON line per step in ``<run_dir>/metrics.jsonl``.

Useful without any tracking server (``jq``/pandas), and for comparing runs step by step. After a
resume, the steps replayed since the last checkpoint appear again; readers keep the last line
of each step."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.trainer.callbacks.base import Callback


class MetricsFileCallback(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def pre_train(self) -> None:
        if self.trainer.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """Step -> metrics, keeping the last record of each step."""
    out: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
    return out
