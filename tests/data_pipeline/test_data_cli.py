"""The ``data`` commands: ``data clean`` in a subprocess, argument parsing, config errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from data_pipeline.cli import add_data_commands, main

REPO = Path(__file__).resolve().parents[2]


def test_data_clean_subprocess_writes_stats(tmp_path: Path) -> None:
    from data_pipeline.corpus import build_stdlib_corpus

    raw = tmp_path / "raw.jsonl"
    build_stdlib_corpus(raw, max_bytes=20_000)
    first = raw.read_text().splitlines()[0]
    with raw.open("a") as f:
        f.write(first + "\n" + '{"id": "broken", "text": ' + "\n")  # an exact duplicate and bad JSON
    out = tmp_path / "cleaned"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.cli",
            "data",
            "clean",
            "--input",
            str(raw),
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    totals = stats["totals"]
    n_lines = len(raw.read_text().splitlines())
    assert totals["in"] == n_lines and totals["quarantined"] == 1 and 0 < totals["kept"] < n_lines - 1
    assert totals["in"] == totals["kept"] + totals["dropped"] + totals["quarantined"]
    kept = [
        json.loads(x) for p in sorted((out / "output").glob("*.jsonl")) for x in p.read_text().splitlines()
    ]
    assert len(kept) == totals["kept"] and len({r["text"] for r in kept}) == len(kept)
    assert any((out / "quarantine").iterdir())
    assert str(out / "stats.json") in proc.stdout


def test_parser_registration() -> None:
    parser = argparse.ArgumentParser(prog="pretrain")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "run", "configs/data-example.yaml", "--set", "selfclean.rounds=3"])
    assert (args.command, args.data_command, args.overrides) == ("data", "run", ["selfclean.rounds=3"])
    args = parser.parse_args(["data", "clean", "--input", "a.jsonl", "b", "--output", "o", "--workers", "2"])
    assert args.input == [Path("a.jsonl"), Path("b")] and args.workers == 2 and args.tasks is None


def test_data_run_config_error_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("inputs:\n  stdlib: true\ntokenizer:\n  vocab_sise: 100\n")
    assert main(["data", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "tokenizer.vocab_sise" in err and "tokenizer.vocab_size" in err
