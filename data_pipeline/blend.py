"""Blends: weighted mixtures of tokenized outputs, resolved to a training run's ``data.paths`` /
``data.weights`` (megatron-core's blend: each sample is drawn from dataset ``i`` with probability
proportional to ``weights[i]``).

An entry names a Megatron prefix (``PREFIX.bin`` + ``PREFIX.idx``) or a glob of prefixes
(``runs/data/web/tokens/*``, matched against the ``.idx`` files); a glob's weight is shared by
its matches in proportion to their ``.bin`` sizes (their token counts when the dtype is the same),
so a split-up dataset weighs the same as the merged one. Every file is checked to exist; empty
datasets (a ``.bin`` of 0 bytes) are left out of the blend.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from pretrain.config import Config


class BlendEntry(Config):
    """One component of a blend."""

    path: str
    """A Megatron prefix, or a glob of prefixes (matched against ``*.idx``)."""
    weight: float = Field(1.0, gt=0.0)
    """Relative weight of this component (shared by a glob's matches by size)."""


class BlendConfig(Config):
    """The ``blend`` section of a data run."""

    include_output: bool = True
    """Put this run's own tokenized output in the blend (weight ``output_weight``)."""
    output_weight: float = Field(1.0, gt=0.0)
    """Weight of this run's own output."""
    entries: list[BlendEntry] = Field(default_factory=list)
    """Other tokenized datasets to mix in (they must use the same tokenizer)."""
    run_config: str | None = None
    """A training run config (YAML path or preset name) to apply the blend to; the result is
    written to ``<output_dir>/run_config.yaml`` for ``pretrain train``."""
    run_overrides: list[str] = Field(default_factory=list)
    """``--set`` overrides for ``run_config`` (the blend's data keys are applied after them)."""


def _prefixes(entry: BlendEntry) -> list[Path]:
    pattern = entry.path[: -len(".idx")] if entry.path.endswith((".idx", ".bin")) else entry.path
    if glob.has_magic(pattern):
        found = sorted(Path(p[: -len(".idx")]) for p in glob.glob(f"{pattern}.idx"))
        if not found:
            raise FileNotFoundError(f"blend entry {entry.path!r}: no '<prefix>.idx' matches the glob")
        return found
    return [Path(pattern)]


@dataclass
class ResolvedBlend:
    """A blend as training consumes it: one weight per existing prefix, normalised to sum 1."""

    paths: list[str]
    weights: list[float]
    tokenizer: str | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_weights(self) -> list[float] | None:
        """``data.weights`` for training: ``None`` for a single dataset (nothing to blend)."""
        return self.weights if len(self.paths) > 1 else None

    def overrides(self) -> list[str]:
        """``--set`` strings for a :class:`~pretrain.run_config.RunConfig` (JSON lists are YAML)."""
        sets = [f"data.paths={json.dumps(self.paths)}", f"data.weights={json.dumps(self.run_weights)}"]
        if self.tokenizer:
            sets.append(f"data.tokenizer={self.tokenizer}")
        return sets

    def apply(self, run_config: Any) -> Any:
        """A copy of ``run_config`` (a ``RunConfig``) training on this blend."""
        data = run_config.data.model_copy(update={"paths": self.paths, "weights": self.run_weights})
        if self.tokenizer:
            data.tokenizer = self.tokenizer
        return run_config.model_copy(update={"data": type(data).model_validate(data.to_dict())})

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**asdict(self), "overrides": self.overrides()}, indent=2))
        tmp.replace(path)
        return path


def resolve_blend(entries: list[BlendEntry], *, tokenizer: str | None = None) -> ResolvedBlend:
    """Expand globs, check every ``.bin``/``.idx`` exists and compute the per-prefix weights.

    Raises:
        FileNotFoundError: a prefix lacks its files, or a glob matches nothing (names the entry).
        ValueError: no entries, or a prefix appears twice.
    """
    if not entries:
        raise ValueError("the blend is empty: add blend.entries or set blend.include_output")
    paths: list[str] = []
    raw: list[float] = []
    described = []
    for entry in entries:
        prefixes = _prefixes(entry)
        sizes = []
        for prefix in prefixes:
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
            if missing:
                raise FileNotFoundError(f"blend entry {entry.path!r}: missing {', '.join(missing)}")
            sizes.append(Path(f"{prefix}.bin").stat().st_size)
        total = sum(sizes)
        if not total:
            raise ValueError(f"blend entry {entry.path!r}: its datasets are empty")
        for prefix, size in zip(prefixes, sizes):
            if str(prefix) in paths:
                raise ValueError(f"blend entry {entry.path!r}: {prefix} is already in the blend")
            if size:
                paths.append(str(prefix))
                raw.append(entry.weight * size / total)
        described.append({"path": entry.path, "weight": entry.weight, "prefixes": [str(p) for p in prefixes]})
    norm = sum(raw)
    return ResolvedBlend(paths, [w / norm for w in raw], tokenizer, described)
