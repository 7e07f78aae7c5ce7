import json
import struct

import pytest

from data_pipeline.bitext import BitextConfig, CleanConfig, clean_pair, iter_catalog, normalize, prepare
from data_pipeline.tokenizer import SentencePieceTokenizer


def write_mo(path, messages: dict[str, str]) -> None:
    """A minimal GNU .mo file (no hash table)."""
    items = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **messages}.items())
    ids = [k.encode() for k, _ in items]
    strs = [v.encode() for _, v in items]
    n = len(items)
    start = 7 * 4 + 16 * n
    offsets, blob = [], b""
    for s in ids + strs:
        offsets.append((len(s), start + len(blob)))
        blob += s + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    tables = b"".join(struct.pack("<2I", *o) for o in offsets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables + blob)


WORDS = {
    "de": ["Datei", "offen", "schließen", "speichern", "Fenster", "neu", "Hilfe", "Ordner"],
    "fr": ["fichier", "ouvert", "fermer", "enregistrer", "fenêtre", "nouveau", "aide", "dossier"],
}
EN = ["file", "open", "close", "save", "window", "new", "help", "folder"]


@pytest.fixture(scope="module")
def locale_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("locale")
    for lang, words in WORDS.items():
        msgs = {}
        for i in range(8):
            for j in range(8):
                msgs[f"{EN[i]} the {EN[j]} now"] = f"{words[i]} {words[j]} jetzt-{lang}"
        msgs["_Open"] = f"_{words[1]}"  # accelerator stripped
        msgs["same"] = "same"  # identical sides: dropped
        msgs["a very long English message that is long"] = "x y"  # ratio: dropped
        msgs["two\nlines"] = "zwei\nZeilen"  # multiline: dropped
        write_mo(root / lang / "LC_MESSAGES" / "app.mo", msgs)
    write_mo(root / "de" / "LC_MESSAGES" / "other.mo", {"\x07file the open now": "\x07Datei offen jetzt-de"})
    return root


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
