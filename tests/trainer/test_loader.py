"""The sample loader: one global sample order whatever the data-parallel layout."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain.data.loader import SampleLoader


class Numbered:
    """A dataset whose sample ``i`` holds the number ``i``."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = torch.full((4,), i)
        return {"tokens": t, "labels": t, "loss_mask": torch.ones(4)}


def _ids(loader: SampleLoader, calls: int) -> list[int]:
    return [int(x) for _ in range(calls) for x in loader.next_micro_batch().tokens[:, 0]]


def test_dp_ranks_partition_the_single_process_stream() -> None:
    single = _ids(SampleLoader(Numbered(), 4), 3)
    ranks = [SampleLoader(Numbered(), 2, dp_rank=r, dp_size=2) for r in range(2)]
    per_rank = [[int(x) for x in r.next_micro_batch().tokens[:, 0]] for _ in range(3) for r in ranks]
    assert sorted(x for batch in per_rank for x in batch) == sorted(single) == list(range(12))


def test_resume_under_another_layout_continues_the_stream_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    saved = SampleLoader(Numbered(), 4)
    _ids(saved, 2)
    resumed = SampleLoader(Numbered(), 4, dp_rank=0, dp_size=2)
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(saved.state_dict())
    assert "global micro-batch changed from 4 to 8" in caplog.text
    assert _ids(resumed, 1) == [8, 9, 10, 11]  # no sample skipped or repeated
