import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.corpus import build_stdlib_corpus
from data_pipeline.jsonl import iter_jsonl_texts
from data_pipeline.tokenize import tokenize_to_megatron
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    build_stdlib_corpus(path, max_bytes=400_000)
    return path


@pytest.fixture(scope="module")
def model(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok") / "sp", vocab_size=1000)


def test_special_ids_and_identifiers(model: Path) -> None:
    tok = SentencePieceTokenizer(model)
    assert (tok.pad, tok.unk, tok.bos, tok.eos, tok.eod) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID, EOS_ID)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 1000
    ident = json.loads(json.dumps(tok.unique_identifiers))
    assert len(ident["model_sha256"]) == 64 and ident["vocab_size"] == 1000


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x  # indented\n\n\n\tdone",
        "  leading spaces and trailing  ",
        "日本語のテキスト, emoji 🤖🎉, Ünïcödé, Ελληνικά, العربية",
        "control \x00\x01\x7f and \r\n line ends, \u200b zero width",
        "",
        "\U0010fffd private plane",
    ],
)
def test_round_trip_any_text(model: Path, text: str) -> None:
    tok = SentencePieceTokenizer(model)
    ids = tok.encode(text)
    assert tok.decode(ids) == text == tok.detokenize(tok.tokenize(text))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert PAD_ID not in ids and UNK_ID not in ids and EOS_ID not in ids


def test_training_is_deterministic(corpus: Path, model: Path, tmp_path: Path) -> None:
    # the model file embeds its prefix, so train again under the same prefix name
    again = train_tokenizer([corpus], tmp_path / model.stem, vocab_size=1000)
    a, b = SentencePieceTokenizer(model), SentencePieceTokenizer(again)
    assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [b.id_to_piece(i) for i in range(b.vocab_size)]


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_to_megatron_matches_encode(corpus: Path, model: Path, tmp_path: Path, workers: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "data" / "stdlib"
    result = tokenize_to_megatron([corpus], model, prefix, workers=workers)
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["stdlib.bin", "stdlib.idx"]

    tok = SentencePieceTokenizer(model)
    expected = [[*tok.encode(t), tok.eod] for t in iter_jsonl_texts([corpus])]
    ds = IndexedDataset(str(prefix))
    assert len(ds) == result["documents"] == len(expected)
    assert result["tokens"] == sum(map(len, expected))
    assert ds.index.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert list(ds.document_indices) == list(range(len(expected) + 1))


def test_tokenize_without_eod(corpus: Path, model: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    result = tokenize_to_megatron([corpus], model, tmp_path / "x", append_eod=False)
    ds = IndexedDataset(str(tmp_path / "x"))
    tok = SentencePieceTokenizer(model)
    first = next(iter_jsonl_texts([corpus]))
    assert ds[0].tolist() == tok.encode(first)
    assert result["tokens"] == int(ds.sequence_lengths.sum())


def test_megatron_gpt_dataset_accepts_tokenizer(corpus: Path, model: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = tmp_path / "stdlib"
    tokenize_to_megatron([corpus], model, prefix)
    tok = SentencePieceTokenizer(model)
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        blend=([str(prefix)], None),
        split="100,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape[0] == 64
    assert int(sample["tokens"].max()) < tok.vocab_size
