import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import jsonl
from data_pipeline.clean import CleanConfig, expand_clean_inputs, run_clean
from tests.data_pipeline.test_clean import rules_only
from tests.data_pipeline.test_planted_junk import LEGAL_PROSE, MARKDOWN_DOC, TECH_PROSE


def _kept(out: Path) -> dict[str, dict]:
    return {
        (r := json.loads(line))["id"]: r
        for f in (out / "output").glob("*.jsonl")
        for line in f.read_text(encoding="utf-8").splitlines()
    }


def _quarantine(out: Path) -> list[dict]:
    return [
        json.loads(line) for f in (out / "quarantine").glob("*.jsonl") for line in f.read_text().splitlines()
    ]


def test_parquet_with_custom_columns_and_bad_rows(tmp_path: Path) -> None:
    table = pa.table(
        {
            "doc_id": ["a", "b", "c", "d"],
            "body": [TECH_PROSE, None, LEGAL_PROSE, "bin\x00ary " * 10],
            "year": [2020, 2021, 2022, 2023],
        }
    )
    pq.write_table(table, tmp_path / "docs.parquet")
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "no_text.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    cfg = rules_only(text_key="body", id_key="doc_id", tasks=2)
    stats = run_clean([tmp_path], tmp_path / "out", cfg)
    kept = _kept(tmp_path / "out")
    assert set(kept) == {"a", "c"} and kept["a"]["year"] == 2020
    reasons = {q["reason"] for q in _quarantine(tmp_path / "out")}
    assert reasons == {"missing_text", "binary_content", "missing_text_column", "unreadable_file"}
    assert stats["stages"]["reader"]["in"] == 4 + 1 + 1


def test_text_directory_one_document_per_file(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "intro.md").write_text(MARKDOWN_DOC)
    (root / "sub" / "notes.txt").write_text(TECH_PROSE)
    (root / "sub" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    (root / "image.png").write_bytes(b"\x89PNG\x00\x00")  # not matched by text_globs: ignored
    stats = run_clean([root], tmp_path / "out", rules_only(tasks=2))
    kept = _kept(tmp_path / "out")
    assert set(kept) == {"intro.md", "sub/notes.txt"}
    assert "```bash" in kept["intro.md"]["text"]  # Markdown structure kept
    assert [q["reason"] for q in _quarantine(tmp_path / "out")] == ["invalid_utf8"]
    assert stats["stages"]["reader"]["in"] == 3


def test_expand_inputs_formats(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt", "e.md", "f.csv"):
        (tmp_path / name).write_bytes(b"")
    found = expand_clean_inputs([tmp_path])
    assert [f.name for f in found.files] == ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt", "e.md"]
    assert found.formats == ["jsonl", "jsonl", "parquet", "text", "text"]
    with pytest.raises(FileNotFoundError):
        expand_clean_inputs([tmp_path / "missing"])


def test_zstd_jsonl_is_read(tmp_path: Path) -> None:
    import zstandard

    texts = [f"Document number {i} explains how the reader handles compressed input files." for i in range(3)]
    raw = "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert [r["text"] for r in jsonl.iter_jsonl_records([path])] == texts


def test_zstd_without_zstandard_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(jsonl.ZSTD_MAGIC + b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as on a machine without the package
    with pytest.raises(jsonl.MissingDependencyError, match="zstandard"):
        run_clean([path], tmp_path / "out", CleanConfig())
