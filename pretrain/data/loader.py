"""Training data: megatron-core's ``GPTDataset`` over tokenized ``.bin/.idx`` shards, read in a
fixed, seed-determined order by a loader whose only state is how many samples it has consumed.

That single integer makes resumption exact: the sample at global index ``i`` is the same in
every run with the same data, seed and sequence length (megatron caches its shuffle indices on
disk keyed by those), so a restarted run continues with exactly the batch it would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from pretrain.config import Config

logger = logging.getLogger(__name__)


class DataConfig(Config):
    """Where the tokenized training data lives and how it is cut into samples."""

    paths: list[str] = Field(default_factory=lambda: ["runs/quickstart/data/tokens/corpus"])
    """Megatron dataset prefixes (``PREFIX.bin`` / ``PREFIX.idx``), relative to the working directory."""
    weights: list[float] | None = None
    """Blend weights, one per path; ``None`` weighs each path by its size."""
    tokenizer: str = "runs/quickstart/data/tokenizer/tokenizer.model"
    """The SentencePiece model the shards were tokenized with."""
    seq_len: int = 256
    """Tokens per training sample."""
    split: str = "98,2,0"
    """Train/validation/test proportions of the documents, as megatron's split string."""
    seed: int = 1234
    """Seed of the sample order (megatron's dataset shuffle)."""
    cache_dir: str | None = None
    """Where megatron caches its sample indices; ``None`` means ``<run_dir>/data_cache``."""

    @field_validator("seq_len")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be a positive number of tokens")
        return v

    @model_validator(mode="after")
    def _weights_match(self) -> DataConfig:
        if not self.paths:
            raise ValueError("data.paths: give at least one dataset prefix")
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}"
                )
            if any(w <= 0 for w in self.weights):
                raise ValueError("data.weights must all be positive")
        return self

    def check_files(self) -> None:
        """Fail early, naming the missing file, before any dataset index is built."""
        missing = [
            f"{p}{ext}" for p in self.paths for ext in (".bin", ".idx") if not Path(f"{p}{ext}").is_file()
        ]
        if not Path(self.tokenizer).is_file():
            missing.append(self.tokenizer)
        if missing:
            raise FileNotFoundError(
                "training data not found: "
                + ", ".join(missing)
                + " (run `pretrain quickstart` to build the default data, or set data.paths / data.tokenizer)"
            )


def build_gpt_datasets(
    config: DataConfig, tokenizer: Any, *, train_samples: int, valid_samples: int, cache_dir: Path
) -> tuple[Any, Any]:
    """Build megatron-core train and validation ``GPTDataset`` s (blended when several paths)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config.check_files()
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights = list(config.weights) if config.weights is not None else None
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_len,
        blend=([str(Path(p).resolve()) for p in config.paths], weights),
        split=config.split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Silence megatron's per-split INFO chatter; warnings still show.
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    # megatron's BlendedDataset asks torch.distributed for the rank when it caches its indices;
    # a one-process run gets an in-memory world of one for the build, and no group after it.
    own_group = weights is not None and _ensure_process_group()
    # With weights megatron needs a size for every split ("size_is_none => weights_are_none").
    test_samples = 0 if weights is not None else None
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, test_samples], lambda: True, gpt_config
        ).build()
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if train is None or valid is None:
        raise ValueError(f"data.split={config.split!r} leaves no train or no validation documents")
    return train, valid


def _ensure_process_group() -> bool:
    """Start a one-process group if none exists; returns whether it did."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


@dataclass
class Batch:
    """One micro-batch: inputs, next-token targets and the loss mask, each (batch, seq_len)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device))

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


class SampleLoader:
    """Reads consecutive global batches from a map-style dataset, this rank's slice of each.

    Args:
        dataset: indexable by sample number, returning ``tokens``/``labels``/``loss_mask``.
        micro_batch_size: samples per micro-batch on this rank.
        dp_rank, dp_size: this rank's position in the data-parallel group.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = 0

    def next_micro_batch(self) -> Batch:
        """The next micro-batch for this rank; every rank advances the global position alike."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        idx = [(start + i) % len(self.dataset) for i in range(self.micro_batch_size)]
        samples = [self.dataset[i] for i in idx]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return Batch(
            tokens=torch.stack([s["tokens"] for s in samples]),
            labels=torch.stack([s["labels"] for s in samples]),
            loss_mask=torch.stack([s["loss_mask"] for s in samples]),
        )

    @property
    def samples_per_call(self) -> int:
        """Global samples consumed by one ``next_micro_batch`` call (all dp ranks together)."""
        return self.micro_batch_size * self.dp_size

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "samples_per_call": self.samples_per_call}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved global sample position. The sample stream is one global order, so
        a new layout never skips or repeats a sample; if the global micro-batch changed size
        (another dp or micro-batch size), batch boundaries differ from the saved run's: say so."""
        self.consumed_samples = int(state["consumed_samples"])
        saved = state.get("samples_per_call")
        if saved is not None and int(saved) != self.samples_per_call:
            logger.warning(
                "global micro-batch changed from %d to %d samples (micro_batch_size x dp): resuming at "
                "sample %d of the same order without skipping or repeating data, but batches are "
                "composed differently from the saved run's",
                int(saved),
                self.samples_per_call,
                self.consumed_samples,
            )
