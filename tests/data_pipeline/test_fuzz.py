"""Fuzz: thousands of malformed and odd records mixed with good ones never crash the pipeline, and
every input line is accounted for (kept, dropped or quarantined) at every step and in total."""

import gzip
import itertools
import json
import random
from pathlib import Path

from data_pipeline.clean import CleanConfig, run_clean
from tests.data_pipeline.test_planted_junk import TECH_PROSE

N_RECORDS = 3000


def _good(rng: random.Random, i: int) -> bytes:
    paragraphs = TECH_PROSE.split("\n\n")
    text = f"Record {i}: " + rng.choice(paragraphs).replace("gradient", f"gradient-{i}")
    return json.dumps({"id": f"good-{i}", "text": text}).encode() + b"\n"


def _bad(rng: random.Random, i: int) -> bytes:
    kind = rng.randrange(14)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))).replace(b"\n", b"") + b"\n"
    if kind == 1:
        return b'{"id": "x", "text": "unterminated' + b"\n"
    if kind == 2:
        return json.dumps({"id": i, "text": rng.choice([1, 2.5, None, [], {}, True])}).encode() + b"\n"
    if kind == 3:
        return json.dumps({"id": i, "text": "y" * 300_000}).encode() + b"\n"  # over max_record_bytes
    if kind == 4:
        return json.dumps({"id": i, "text": "nul\x00byte" * 20}).encode() + b"\n"
    if kind == 5:
        return b'{"id": 1, "text": "caf\xe9 \xff\xfe bad utf8"}\n'
    if kind == 6:
        return b"[" * 50_000 + b"]" * 50_000 + b"\n"  # deeply nested
    if kind == 7:
        return b"\n" if rng.random() < 0.5 else b"   \t \n"
    if kind == 8:
        return b"\xef\xbb\xbf" + json.dumps({"id": i, "text": "BOM-prefixed line " * 5}).encode() + b"\n"
    if kind == 9:
        return json.dumps([1, 2, 3]).encode() + b"\n"
    if kind == 10:
        return json.dumps({"id": i, "text": "\ud800 lone surrogate"}).encode() + b"\n"
    if kind == 11:
        return json.dumps({"id": i, "body": "no text field"}).encode() + b"\n"
    if kind == 12:
        return json.dumps({"id": i, "text": ""}).encode() + b"\n"
    return (
        json.dumps({"id": i, "text": "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(200))}).encode()
        + b"\n"
    )


def test_fuzz_no_crash_and_exact_reconciliation(tmp_path: Path) -> None:
    rng = random.Random(1234)
    lines = [_good(rng, i) if rng.random() < 0.2 else _bad(rng, i) for i in range(N_RECORDS)]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"".join(lines[:2000]))
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(lines[2000:])))
    truncated = tmp_path / "c.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(lines[:500]))[:3000])  # cut mid-stream
    no_newline = tmp_path / "d.jsonl"
    no_newline.write_bytes(_good(rng, 99_999).rstrip(b"\n"))

    cfg = CleanConfig(tasks=2, max_record_bytes=100_000)
    stats = run_clean([plain, gz, truncated, no_newline], tmp_path / "out", cfg)

    stages = list(stats["stages"].items())
    for name, s in [*stages, ("totals", stats["totals"])]:
        assert s["in"] == s["kept"] + s["dropped"] + s["quarantined"], name
        assert sum(s["reasons"].values()) == s["dropped"] + s["quarantined"] if "reasons" in s else True
    for (prev_name, prev), (name, cur) in itertools.pairwise(stages):
        assert cur["in"] == prev["kept"], f"{prev_name} -> {name}"

    reader = stats["stages"]["reader"]
    # every line of the complete files, the readable lines of the truncated one, and one
    # unreadable_file entry for it
    readable_truncated = reader["in"] - N_RECORDS - 1 - 1
    assert 0 < readable_truncated < 500
    quarantine = [
        json.loads(line)
        for f in (tmp_path / "out" / "quarantine").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert len(quarantine) == reader["quarantined"]
    reasons = reader["reasons"]
    for reason in (
        "invalid_json",
        "invalid_utf8",
        "non_string_text",
        "missing_text",
        "binary_content",
        "line_too_long",
        "not_an_object",
        "invalid_unicode",
        "unreadable_file",
    ):
        assert reasons.get(f"quarantined_{reason}", 0) > 0, reason
    assert reasons["quarantined_unreadable_file"] == 1
    kept = [
        json.loads(line)
        for f in (tmp_path / "out" / "output").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    # the good records are small edits of a few paragraphs: MinHash keeps one per paragraph
    assert len(kept) == stats["totals"]["kept"] > 0
    assert stats["stages"]["near_dedup"]["dropped"] > 100
