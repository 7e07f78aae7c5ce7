import json

from data_pipeline.bitext import BitextConfig, CleanConfig, clean_pair, iter_catalog, normalize, prepare
from data_pipeline.tokenizer import SentencePieceTokenizer


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
