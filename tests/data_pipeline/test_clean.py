import gzip
import itertools
import json
from pathlib import Path

import pytest

from data_pipeline.clean import CleanConfig, run_clean
from pretrain.config import ConfigError

PROSE = (
    "The quick brown fox jumps over the lazy dog. This sentence is long enough to pass the length "
    "filter, and it is plain English prose with nothing to clean."
)
CODE = (
    "def parse(value: str) -> int:\n"
    '    """Parse an integer."""\n'
    "    if not value:\n"
    "        return 0\n"
    "\n"
    "    total = 0\n"
    "    for ch in value:\n"
    "        total = total * 10 + int(ch)\n"
    "    return total\n"
)
HTML = "<html><body><p>Paragraph one with <b>bold</b> text &amp; more words here.</p><div>Second block of text.</div></body></html>"
URLS = "Read the documentation at https://docs.example.com/guide?x=1 before you start, or visit www.example.org for news."
PUNCT = "This is amazing!!!!!!! Really???? Wait...... what,,,,, happened here in this long sentence?"
MARKDOWN = "# Title\n\nSome text under the title.\n\n\n\n\n\n- item one\n- item two\n\n    indented code block\n\n$$x^2 + y^2$$"


#: Formatting and reading only: the quality, language and near-duplicate filters (tested in
#: test_filters.py / test_planted_junk.py) would drop these short snippets.
RULES_ONLY = {
    "garbled_filter": False,
    "language": {"enabled": False},
    "gopher_repetition": {"enabled": False},
    "gopher_quality": {"enabled": False},
    "c4": {"enabled": False},
    "fineweb": {"enabled": False},
    "minhash": {"enabled": False},
}


def rules_only(**overrides: object) -> CleanConfig:
    return CleanConfig.from_dict(RULES_ONLY | overrides)


def _line(**record: object) -> bytes:
    return json.dumps(record).encode() + b"\n"


@pytest.fixture
def raw_input(tmp_path: Path) -> Path:
    lines = [
        _line(id="prose", text=PROSE, source="test"),
        _line(id="code", text=CODE),
        _line(id="html", text=HTML),
        _line(id="urls", text=URLS),
        _line(id="punct", text=PUNCT),
        _line(id="markdown", text=MARKDOWN),
        _line(id="prose-dup", text=PROSE + "  \n"),  # duplicate after whitespace normalisation
        b'{"id": "broken", "text": "unterminated\n',  # invalid JSON
        b'{"id": "latin1", "text": "caf\xe9 ' + b"x" * 60 + b'"}\n',  # invalid UTF-8
        _line(id="no-text", body="where is the text"),
        _line(id="int-text", text=12345),
        b"\x89PNG\r\x1a\x00\x00\x00\rIHDR\x00\x00\x01\x00"
        + bytes(b for b in range(256) if b != 10)
        + b"\n",  # binary blob
        _line(id="nul-text", text="\x00\x01\x02\x03binary" * 10),
        b"\n",
        _line(id="short", text="too short"),
    ]
    path = tmp_path / "raw.jsonl.gz"  # gzip input
    with gzip.open(path, "wb") as f:
        f.writelines(lines)
    return path


def _read_output(out: Path) -> dict[str, dict]:
    records = {}
    for file in sorted((out / "output").glob("*.jsonl")):
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            records[record["id"]] = record
    return records


def _check_balanced(stats: dict) -> None:
    stages = list(stats["stages"].items())
    for name, s in [*stages, ("totals", stats["totals"])]:
        assert s["in"] == s["kept"] + s["dropped"] + s["quarantined"], name
    for (prev_name, prev), (name, cur) in itertools.pairwise(stages):
        assert cur["in"] == prev["kept"], f"{prev_name} -> {name}"


def test_run_clean_end_to_end(raw_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stats = run_clean([raw_input], out, rules_only())
    docs = _read_output(out)

    assert set(docs) == {"prose", "code", "html", "urls", "punct", "markdown"}
    assert docs["prose"]["text"] == PROSE and docs["prose"]["source"] == "test"
    assert docs["code"]["text"] == CODE.rstrip("\n")  # indentation and blank lines intact
    assert "<" not in docs["html"]["text"] and "&amp;" not in docs["html"]["text"]
    assert "Paragraph one with bold text & more words here." in docs["html"]["text"]
    assert "http" not in docs["urls"]["text"] and "www." not in docs["urls"]["text"]
    assert docs["urls"]["text"].startswith("Read the documentation at before you start")
    assert (
        docs["punct"]["text"] == "This is amazing! Really? Wait... what, happened here in this long sentence?"
    )
    assert docs["markdown"]["text"] == MARKDOWN.replace("\n\n\n\n\n\n", "\n\n\n")

    quarantined = {}
    for file in (out / "quarantine").glob("*.jsonl"):
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            assert entry["file"] == str(raw_input) and entry["line"] >= 1
            quarantined[entry["line"]] = entry["reason"]
    assert quarantined == {
        8: "invalid_json",
        9: "invalid_utf8",
        10: "missing_text",
        11: "non_string_text",
        12: "binary_content",
        13: "binary_content",
    }

    _check_balanced(stats)
    assert stats["totals"] == {"in": 15, "kept": 6, "dropped": 3, "quarantined": 6}
    assert stats["stages"]["exact_dedup"]["reasons"] == {"dropped_duplicate": 1}
    assert stats["stages"]["length_filter"]["reasons"] == {"dropped_too_short": 1}
    assert stats["stages"]["reader"]["reasons"]["quarantined_binary_content"] == 2
    assert json.loads((out / "stats.json").read_text()) == stats

    # a re-run skips every finished task and reports the same numbers
    before = {p: p.stat().st_mtime_ns for p in (out / "output").iterdir()}
    assert run_clean([raw_input], out, rules_only()) == stats
    assert {p: p.stat().st_mtime_ns for p in (out / "output").iterdir()} == before


def test_dedup_is_global_across_tasks(tmp_path: Path) -> None:
    texts = [f"Document number {i} has enough words to be kept by the length filter." for i in range(20)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": texts[i % 7]}) + "\n" for i in range(20)))
    cfg = rules_only(tasks=3, workers=2, compress_output=True)
    stats = run_clean([path], tmp_path / "out", cfg)
    _check_balanced(stats)
    kept = [
        json.loads(line)["text"]
        for f in sorted((tmp_path / "out" / "output").glob("*.jsonl.gz"))
        for line in gzip.open(f, "rt")
    ]
    assert sorted(kept) == sorted(set(texts[:7]))
    assert stats["stages"]["exact_dedup"]["dropped"] == 13


def test_changed_settings_refuse_to_resume(raw_input: Path, tmp_path: Path) -> None:
    run_clean([raw_input], tmp_path / "out", rules_only(dedup=False))
    with pytest.raises(ValueError, match="other inputs or settings"):
        run_clean([raw_input], tmp_path / "out", rules_only(dedup=True))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="min_chars"):
        CleanConfig.from_dict({"min_chars": 10, "max_chars": 5})
    with pytest.raises(ConfigError, match="did you mean"):
        CleanConfig.from_dict({"min_char": 10})


def test_long_lines_and_corrupt_gzip_are_quarantined(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_bytes(
        _line(id="ok", text=PROSE) + _line(id="huge", text="y" * 5000) + _line(id="ok2", text=CODE)
    )
    corrupt = tmp_path / "b.jsonl.gz"
    corrupt.write_bytes(gzip.compress(_line(id="z", text=PROSE) * 50)[:60])  # truncated stream
    stats = run_clean([good, corrupt], tmp_path / "out", rules_only(max_record_bytes=1000))
    _check_balanced(stats)
    assert set(_read_output(tmp_path / "out")) == {"ok", "ok2"}
    reasons = stats["stages"]["reader"]["reasons"]
    assert reasons["quarantined_line_too_long"] == 1
    assert reasons["quarantined_unreadable_file"] == 1
