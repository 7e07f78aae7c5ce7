import json
from pathlib import Path

from data_pipeline.corpus import build_stdlib_corpus


def test_stdlib_corpus_valid_deterministic_and_bounded(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = build_stdlib_corpus(a, max_bytes=300_000)
    assert build_stdlib_corpus(b, max_bytes=300_000) == stats
    assert a.read_bytes() == b.read_bytes()

    records = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(records) == stats["documents"] > 10
    assert all(set(r) == {"id", "text", "source"} and isinstance(r["text"], str) for r in records)
    total = sum(len(r["text"].encode("utf-8")) for r in records)
    assert total == stats["bytes"] <= 300_000
    sources = {r["source"] for r in records}
    assert sources == {"python-stdlib:docstring", "python-stdlib:code"}
    assert not any("/test/" in r["id"] or r["id"].startswith("test/") for r in records)
    assert len({r["id"] for r in records}) == len(records)
