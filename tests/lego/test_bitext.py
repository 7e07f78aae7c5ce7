import gzip
import json
from pathlib import Path

import pytest

from data_pipeline.bitext import (
    BitextConfig,
    BitextInput,
    CleanConfig,
    clean_pair,
    iter_catalog,
    normalize,
    parse_input_spec,
    prepare,
)
from data_pipeline.bitext.pipeline import build_pairs, input_langs
from data_pipeline.bitext.readers import BitextFileReader
from data_pipeline.tokenizer import SentencePieceTokenizer
from pretrain.lego.cli import main as lego_main
from tests.lego.conftest import EN, WORDS


def test_iter_catalog_and_cleaning(locale_root):
    pairs = dict(iter_catalog(locale_root / "de" / "LC_MESSAGES" / "app.mo"))
    assert pairs["_Open"] == "_offen" and "" not in pairs
    assert normalize("  _Open \x07 the  file ") == "Open the file"
    cfg = CleanConfig()
    assert clean_pair("same", "same", cfg) == "identical"
    assert clean_pair("", "x", cfg) == "empty"
    assert clean_pair("a very long English message that is long", "x y", cfg) == "ratio"
    assert clean_pair("two\nlines", "zwei\nZeilen", cfg) == "multiline"
    assert clean_pair("%s files", "Dateien", cfg) == "placeholders"
    assert clean_pair("open the file", "Datei öffnen", cfg) is None


def test_prepare_groups_tokenizer_and_split(locale_root, tmp_path):
    cfg = BitextConfig(
        langs=["en", "de", "fr"], locale_root=str(locale_root), heldout_fraction=0.2, vocab_size=400
    )
    stats = prepare(cfg, tmp_path)
    assert set(stats["drops"]) >= {"identical", "ratio", "multiline"}
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    tok = SentencePieceTokenizer(meta["tokenizer"])
    for lang, tag_id in meta["lang_tags"].items():
        assert tok.id_to_piece(tag_id) == f"<2{lang}>"
    heldout = [json.loads(x) for x in (tmp_path / "heldout.jsonl").open()]
    assert heldout and {h["src_lang"] for h in heldout} == {"en", "de", "fr"}
    held_en = {h["src"] for h in heldout if h["src_lang"] == "en"}
    for group in ("en", "de", "fr"):
        rows = [json.loads(x) for x in (tmp_path / "pairs" / f"{group}.jsonl").open()]
        assert rows and all(r["src_lang"] == group and r["tgt_lang"] != group for r in rows)
        if group == "en":
            assert not held_en & {r["src"] for r in rows}
            assert "Open" in {r["src"] for r in rows}
        toks = [json.loads(x) for x in (tmp_path / "tok" / f"{group}.jsonl").open()]
        assert len(toks) == len(rows)
        assert tok.decode(toks[0]["tgt"]) == rows[0]["tgt"]
    # multi-way: de-fr pairs exist although no catalog pairs them directly
    assert stats["train_pairs"]["de-fr"] > 0


# --- TSV / JSONL inputs, quarantine, language check (datatrove pipeline) -------------------------


def test_gettext_pipeline_cap_order_and_tasks(locale_root, tmp_path):
    common = dict(langs=["en", "de", "fr"], locale_root=str(locale_root), max_pairs_per_direction=5)
    groups, heldout, stats = build_pairs(BitextConfig(**common), tmp_path / "one")
    assert set(stats["steps"]) == {
        "gettext_reader",
        "normalise",
        "pair_filters",
        "dedup",
        "language_check",
        "group_writer",
    }
    assert stats["messages"] == 64 + 4 and set(stats["train_pairs"].values()) == {5}
    # four tasks shard the messages, no cap: merged in English order, same held-out split
    full, full_heldout, _ = build_pairs(
        BitextConfig(**{**common, "max_pairs_per_direction": None}, tasks=4), tmp_path / "four"
    )
    assert full_heldout == heldout
    for name, rows in full.items():
        en_rows = [r["src"] if r["src_lang"] == "en" else r["tgt"] for r in rows if "en" in r.values()]
        assert en_rows == sorted(en_rows) and len(rows) > len(groups[name])
        first: dict[str, list] = {}
        for r in rows:  # the cap keeps the first 5 of each direction
            first.setdefault(r["tgt_lang"], []).append(r)
        assert groups[name] == [r for r in rows if r in first[r["tgt_lang"]][:5]]


NO_LID = {"enabled": False}  # synthetic word salad is no language; the check has its own test


def _synthetic(lang: str) -> list[tuple[str, str]]:
    """64 distinct (English, ``lang``) pairs from the fixture's word lists."""
    words = WORDS[lang]
    return [(f"{EN[i]} the {EN[j]} now", f"{words[i]} {words[j]} jetzt") for i in range(8) for j in range(8)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_input_specs_and_formats(tmp_path):
    spec = parse_input_spec("pt_BR-en:/data/x.tsv.gz")
    assert (spec.src_lang, spec.tgt_lang, spec.path, spec.format) == ("pt_BR", "en", "/data/x.tsv.gz", "tsv")
    assert parse_input_spec("/data/y.jsonl.zst").langs is None
    assert parse_input_spec("/data/y.ndjson").format == "jsonl"
    with pytest.raises(ValueError, match="unknown format"):
        BitextInput(path="pairs.txt")
    with pytest.raises(ValueError, match="both src_lang and tgt_lang"):
        BitextInput(path="p.tsv", src_lang="en")
    no_langs = _write_lines(tmp_path / "plain.tsv", ["hello world\tHallo Welt"])
    with pytest.raises(ValueError, match="a TSV needs its languages"):
        input_langs([BitextInput(path=str(no_langs))])
    header = _write_lines(tmp_path / "h.tsv", ["de\ten", "Hallo Welt\thello world"])
    assert input_langs([BitextInput(path=str(header)), parse_input_spec(f"en-fr:{header}")]) == [
        "en",
        "de",
        "fr",
    ]
    per_line = _write_lines(tmp_path / "x.jsonl", [])
    with pytest.raises(ValueError, match="--langs"):
        input_langs([BitextInput(path=str(per_line))])


def test_reader_quarantines_bad_lines_and_keeps_good_ones(tmp_path):
    tsv = _write_lines(
        tmp_path / "a.tsv",
        [
            "en\tde",
            "good one\tgutes eins",
            "three\tcolumns\there",
            "",
            "no tab at all",
            "good two\tgutes zwei",
        ],
    )
    bad_utf8 = tmp_path / "b.jsonl"
    good = {"src_lang": "de", "tgt_lang": "fr", "src": "Hallo Welt", "tgt": "Bonjour le monde"}
    lines = [
        json.dumps(good),
        '{"src": "x", "tgt": ',  # invalid JSON
        "[1, 2]",  # not an object
        json.dumps({"src_lang": "de", "tgt_lang": "fr", "src": "Hallo"}),  # missing tgt
        json.dumps({"src_lang": "de", "tgt_lang": "fr", "src": "Hallo", "tgt": 7}),  # non-string
        json.dumps({"src": "Hallo", "tgt": "Salut"}),  # no languages anywhere
        json.dumps({"src_lang": "de fr", "tgt_lang": "fr", "src": "a", "tgt": "b"}),  # not a code
        json.dumps({"translation": {"en": "Good morning", "fr": "Bonjour"}}),  # HF layout, 2 languages
        json.dumps({"translation": {"en": "Hi", "fr": "Salut", "de": "Hallo"}}),  # 3: ambiguous
        json.dumps({"src_lang": "de", "tgt_lang": "fr", "src": "x" * 300, "tgt": "y"}),  # too long
    ]
    bad_utf8.write_bytes(("\n".join(lines) + "\n").encode() + b'{"src": "\xff\xfe"}\n')
    broken = tmp_path / "c.jsonl.gz"
    broken.write_bytes(
        gzip.compress(b'{"src_lang": "en", "tgt_lang": "de", "src": "a b", "tgt": "c d"}\n' * 50)[:-30]
    )
    inputs = [
        BitextInput(path=str(tsv), src_lang="en", tgt_lang="de"),
        BitextInput(path=str(bad_utf8)),
        BitextInput(path=str(broken)),
    ]
    reader = BitextFileReader(inputs, tmp_path / "q", max_record_bytes=200)
    docs = list(reader.run())
    pairs = [(d.metadata["src_lang"], d.metadata["tgt_lang"], d.text, d.metadata["tgt"]) for d in docs]
    assert pairs[:4] == [
        ("en", "de", "good one", "gutes eins"),
        ("en", "de", "good two", "gutes zwei"),
        ("de", "fr", "Hallo Welt", "Bonjour le monde"),
        ("en", "fr", "Good morning", "Bonjour"),
    ]
    assert all(p[:2] == ("en", "de") for p in pairs[4:])  # what the truncated gzip gave before it broke
    quarantine = _rows(tmp_path / "q" / "00000.jsonl")
    got = [(Path(q["file"]).name, q["line"], q["reason"]) for q in quarantine]
    assert got == [
        ("a.tsv", 3, "wrong_columns"),
        ("a.tsv", 5, "wrong_columns"),
        ("b.jsonl", 2, "invalid_json"),
        ("b.jsonl", 3, "not_an_object"),
        ("b.jsonl", 4, "missing_field"),
        ("b.jsonl", 5, "non_string_field"),
        ("b.jsonl", 6, "missing_language"),
        ("b.jsonl", 7, "bad_language"),
        ("b.jsonl", 9, "missing_language"),
        ("b.jsonl", 10, "line_too_long"),
        ("b.jsonl", 11, "invalid_utf8"),
        ("c.jsonl.gz", len(pairs) - 4 + 1, "unreadable_file"),
    ]
    assert all(q["detail"] and "raw_preview" in q for q in quarantine)
    stats = {k: v.total if hasattr(v, "total") else v for k, v in reader.stats.stats.items()}
    assert stats["in"] == stats["kept"] + stats["dropped"] + stats["quarantined"]
    assert (stats["kept"], stats["quarantined"], stats["dropped_blank_line"], stats["header"]) == (
        len(pairs),
        12,
        1,
        1,
    )


def test_tsv_and_jsonl_inputs_give_groups_and_tokens(tmp_path):
    de, fr = _synthetic("de"), _synthetic("fr")
    tsv = _write_lines(
        tmp_path / "en-de.tsv",
        [f"{e}\t{d}" for e, d in de] + [f"{de[0][0]}\t{de[0][1]}", "same text\tsame text", "a\tb\tc"],
    )
    hf = _write_lines(
        tmp_path / "fr.jsonl.gz",
        [json.dumps({"translation": {"en": e, "fr": f}}) for e, f in fr] + ['{"translation": '],
    )
    de_fr = [
        json.dumps({"src_lang": "fr", "tgt_lang": "de", "src": f, "tgt": d})
        for (_, d), (_, f) in zip(de[:20], fr[:20])
    ]
    mixed = _write_lines(tmp_path / "mixed.jsonl", de_fr)
    cfg = BitextConfig(
        langs=["en", "de", "fr"],
        inputs=[f"en-de:{tsv}", str(hf), str(mixed)],
        language_check=NO_LID,
        heldout_fraction=0.1,
        vocab_size=300,
    )
    stats = prepare(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert stats["quarantined"] == {"wrong_columns": 1, "invalid_json": 1}
    assert stats["drops"] == {"duplicate": 1, "identical": 1}
    assert "gettext_reader" not in stats["steps"] and stats["messages"] == 64 + 2 + 64 + 20
    heldout = _rows(out / "heldout.jsonl")
    every = heldout + [r for g in ("en", "de", "fr") for r in _rows(out / "pairs" / f"{g}.jsonl")]
    for a, b, n in (("en", "de", 64), ("en", "fr", 64), ("de", "fr", 20)):
        for x, y in ((a, b), (b, a)):  # every pair in both directions, train or held out
            assert sum(r["src_lang"] == x and r["tgt_lang"] == y for r in every) == n
    assert {"src_lang": "en", "tgt_lang": "de", "src": de[5][0], "tgt": de[5][1]} in every
    assert 0 < len(heldout) < len(every) / 4
    meta = json.loads((out / "tok" / "meta.json").read_text())
    tok = SentencePieceTokenizer(meta["tokenizer"])
    for group in ("en", "de", "fr"):
        rows = _rows(out / "pairs" / f"{group}.jsonl")
        toks = _rows(out / "tok" / f"{group}.jsonl")
        assert rows and all(r["src_lang"] == group for r in rows) and len(toks) == len(rows)
        assert [tok.decode(t["src"]) for t in toks] == [r["src"] for r in rows]
    assert json.loads((out / "stats.json").read_text())["drops"] == stats["drops"]


GOOD_EN_DE = [
    (
        "I would like to order a cup of coffee and a piece of cake, please.",
        "Ich möchte bitte eine Tasse Kaffee und ein Stück Kuchen bestellen.",
    ),
    (
        "We have to finish the report before the meeting tomorrow morning.",
        "Wir müssen den Bericht vor der Besprechung morgen früh fertigstellen.",
    ),
    ("Open file", "Datei öffnen"),  # too short to judge: kept
]
WRONG_EN_DE = [
    (  # the "German" side is French
        "The weather is very nice today, so we are going to the beach.",
        "Le temps est très beau aujourd'hui, alors nous allons à la plage.",
    ),
    (  # left untranslated (reworded, so not "identical")
        "My sister works at the hospital and comes home late every evening.",
        "My sister works at the hospital and comes home late each evening.",
    ),
]


@pytest.mark.parametrize("enabled", [True, False])
def test_language_check_drops_wrong_language_sides(tmp_path, enabled):
    tsv = _write_lines(tmp_path / "p.tsv", [f"{e}\t{d}" for e, d in GOOD_EN_DE + WRONG_EN_DE])
    cfg = BitextConfig(
        langs=["en", "de"],
        inputs=[f"en-de:{tsv}"],
        language_check={"enabled": enabled},
        heldout_fraction=0,
    )
    groups, _, stats = build_pairs(cfg, tmp_path / "out")
    kept = {(r["src"], r["tgt"]) for r in groups["en"]}
    assert set(GOOD_EN_DE) <= kept
    if not enabled:
        assert set(WRONG_EN_DE) <= kept and "language_check" not in stats["steps"]
        return
    assert not set(WRONG_EN_DE) & kept and stats["drops"] == {"language": 2}
    dropped = _rows(tmp_path / "out" / "dropped" / "language" / "00000.jsonl")
    checks = sorted((d["metadata"]["language_check"]["detected"], d["metadata"]["tgt"]) for d in dropped)
    assert checks == [("en", WRONG_EN_DE[1][1]), ("fr", WRONG_EN_DE[0][1])]
    assert stats["steps"]["language_check"]["counters"]["checked_sides"] == 2 * 4  # not the short pair


def test_cli_data_reads_inputs(tmp_path, capsys):
    tsv = _write_lines(tmp_path / "pairs.tsv", ["en\tde", *(f"{e}\t{d}" for e, d in _synthetic("de"))])
    out = tmp_path / "data"
    argv = ["lego", "data", str(out), "--input", str(tsv), "--no-lang-check", "--vocab-size", "300"]
    assert lego_main(argv) == 0
    meta = json.loads((out / "tok" / "meta.json").read_text())
    assert set(meta["lang_tags"]) == {"en", "de"} and meta["groups"] == {"en": ["en"], "de": ["de"]}
    assert '"train_pairs"' in capsys.readouterr().out
