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


def test_reservoir_sample_covers_the_whole_corpus() -> None:
    from data_pipeline.tokenizer import sample_lines

    texts = [f"line {i}" for i in range(1000)]
    head = sample_lines(texts, 100, sample="head")
    assert head == texts[:100]
    sample = sample_lines(texts, 100, seed=3)
    assert len(sample) == 100 and len(set(sample)) == 100
    indices = [int(s.split()[1]) for s in sample]
    assert indices == sorted(indices)  # corpus order
    assert max(indices) > 900 and min(indices) < 100  # drawn from the whole corpus
    assert sample == sample_lines(texts, 100, seed=3)  # deterministic
    assert sample != sample_lines(texts, 100, seed=4)
    assert sample_lines(texts[:50], 100, seed=3) == texts[:50]  # small corpus: all of it


def test_sampled_training_with_user_symbols(corpus: Path, tmp_path: Path) -> None:
    from data_pipeline.tokenizer import TokenizerConfig

    cfg = TokenizerConfig(vocab_size=600, max_sentences=500, user_symbols=["<|code|>", "<|sep|>"], seed=1)
    model = cfg.train([corpus], tmp_path / "sp")
    tok = SentencePieceTokenizer(model)
    assert tok.vocab_size == 600
    text = "<|code|>def f():\n    pass<|sep|>"
    ids = tok.encode(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert "<|code|>" in pieces and "<|sep|>" in pieces and "\n" in pieces
    assert tok.decode(ids) == text
    assert TokenizerConfig(model=str(model)).train([corpus], tmp_path / "unused") == model


@pytest.mark.parametrize("tasks", [3, 7])
def test_parallel_tokenization_equals_sequential(
    corpus: Path, model: Path, tmp_path: Path, tasks: int
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_pipeline.tokenize import TokenizeConfig, local_runner, tokenize_parallel

    # two input files, one with a blank line and a record without text
    lines = corpus.read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:40]) + "\n\n" + json.dumps({"id": "x", "body": 1}) + "\n")
    b.write_text("\n".join(lines[40:90]) + "\n")
    seq = tokenize_to_megatron([a, b], model, tmp_path / "seq")
    runner = local_runner(workers=2 if tasks == 3 else 1)  # a pool once (its start costs ~10 s)
    par = tokenize_parallel([a, b], model, tmp_path / "par", tasks=tasks, runner=runner)
    assert par["documents"] == seq["documents"] == 90 and par["tokens"] == seq["tokens"]
    assert par["skipped"] == 1 and par["prefixes"] == [str(tmp_path / "par")]
    assert (tmp_path / "par.bin").read_bytes() == (tmp_path / "seq.bin").read_bytes()
    s, p = IndexedDataset(str(tmp_path / "seq")), IndexedDataset(str(tmp_path / "par"))
    assert list(s.document_indices) == list(p.document_indices)
    assert all(s[i].tolist() == p[i].tolist() for i in range(len(s)))
    assert not (tmp_path / "par_shards").exists()

    kept = tokenize_parallel(
        [a, b], model, tmp_path / "unmerged", tasks=tasks, config=TokenizeConfig(merge=False)
    )
    assert len(kept["prefixes"]) == tasks and kept["tokens"] == seq["tokens"]
    shards = [IndexedDataset(prefix) for prefix in kept["prefixes"]]  # keep the mmaps alive
    docs = [ds[i].tolist() for ds in shards for i in range(len(ds))]
    assert docs == [s[i].tolist() for i in range(len(s))]
