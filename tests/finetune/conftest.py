"""Fixtures of the finetuning tests: one checkpoint registry (an sqlite MLflow store) per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory):
    from checkpoints.registry import CheckpointRegistry

    return CheckpointRegistry(tmp_path_factory.mktemp("registry"))
