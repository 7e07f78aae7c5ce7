"""The README's config reference is the one the code generates, and it opens with the two commands."""

from __future__ import annotations

from pretrain.config_reference import config_reference, readme_section
from pretrain.run_config import RunConfig
from tests.conftest import REPO


def test_readme_config_reference_is_current() -> None:
    text = (REPO / "README.md").read_text()
    assert readme_section(text) == config_reference(RunConfig).strip(), (
        "README config reference is stale: run `.venv/bin/python -m pretrain.config_reference README.md`"
    )


def test_readme_opens_with_the_two_commands() -> None:
    head = (REPO / "README.md").read_text().splitlines()[:8]
    assert any(line.startswith("make quickstart") for line in head)
    assert any(line.startswith("make test") for line in head)
