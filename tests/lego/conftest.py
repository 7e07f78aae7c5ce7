import json
import random
import struct

import pytest

LANGS = ["en", "de", "fr"]


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory):
    """Tokenized language-centric groups: the target is a per-language shift of the source."""
    root = tmp_path_factory.mktemp("lego_data")
    tags = {lang: 4 + i for i, lang in enumerate(LANGS)}
    rng = random.Random(0)
    for i, src_lang in enumerate(LANGS):
        with (root / f"{src_lang}.jsonl").open("w") as f:
            for _ in range(24):
                for j, tgt_lang in enumerate(LANGS):
                    if tgt_lang == src_lang:
                        continue
                    src = [rng.randrange(10, 40) for _ in range(rng.randrange(2, 7))]
                    tgt = [t + 3 * (j - i) + 9 for t in src]
                    f.write(
                        json.dumps({"src_lang": src_lang, "tgt_lang": tgt_lang, "src": src, "tgt": tgt})
                        + "\n"
                    )
    (root / "meta.json").write_text(json.dumps({"lang_tags": tags, "eos_id": 3, "pad_id": 0}))
    return root


@pytest.fixture(scope="session")
def full_run(synthetic_pairs, tmp_path_factory):
    from pretrain.lego.train import LegoRunConfig, train
    from tests.lego.test_train import _cfg

    run_dir = tmp_path_factory.mktemp("full")
    data = _cfg(synthetic_pairs).to_dict()
    data["tracking"]["enabled"] = True
    cfg = LegoRunConfig.from_dict(data)
    return run_dir, train(cfg, run_dir)


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


@pytest.fixture(scope="session")
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
