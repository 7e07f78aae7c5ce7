import json
import random

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
