"""SentencePiece BPE tokenizer: training from JSONL and a megatron-core compatible wrapper.

Special ids (fixed, the same for every model trained here):

======  ====  ==========================================================
piece   id    use
======  ====  ==========================================================
<pad>   0     padding (``pad``); never produced by ``encode``
<unk>   1     unknown; never produced in practice (byte fallback)
<s>     2     beginning of sequence (``bos``); not added by ``encode``
</s>    3     end of document (``eos`` == ``eod``), appended by the Megatron writer
======  ====  ==========================================================

Text is not normalised (identity rule, no extra-whitespace removal, no dummy prefix) and unknown
characters fall back to UTF-8 bytes, so ``decode(encode(s)) == s`` for every string ``s``.
Newlines are a user-defined piece; runs of spaces can be pieces, so code indentation is cheap.

Sampling a large corpus: the trainer sees at most ``max_sentences`` lines. With
``sample="reservoir"`` (the default) they are a uniform random sample of *every* non-blank line of
the corpus (Algorithm R, seeded by ``seed``, one pass, memory bounded by ``max_sentences`` lines of
at most :data:`MAX_TRAIN_LINE_BYTES` bytes), kept in corpus order; when the corpus has no more
lines than that, the sample is the whole corpus. ``sample="head"`` takes the first lines instead.
SentencePiece's own ``input_sentence_size`` sampling is switched off, so the sample is ours,
deterministic and testable.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
from pydantic import Field

from data_pipeline.jsonl import iter_jsonl_texts
from pretrain.config import Config

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Lines longer than this many bytes are cut before training (SentencePiece skips longer ones).
MAX_TRAIN_LINE_BYTES = 4096


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-blank lines of the documents, each cut to :data:`MAX_TRAIN_LINE_BYTES`."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            encoded = line.encode("utf-8")
            if len(encoded) > MAX_TRAIN_LINE_BYTES:
                line = encoded[:MAX_TRAIN_LINE_BYTES].decode("utf-8", errors="ignore")
            yield line


def sample_lines(
    texts: Iterable[str],
    max_sentences: int,
    *,
    sample: Literal["reservoir", "head"] = "reservoir",
    seed: int = 0,
) -> list[str]:
    """The training lines: a seeded uniform reservoir sample of all lines, or the first ones.

    Args:
        texts: documents.
        max_sentences: sample size.
        sample: ``"reservoir"`` (uniform over the whole corpus) or ``"head"`` (first lines).
        seed: seed of the reservoir sampler.

    Returns:
        At most ``max_sentences`` lines in corpus order.
    """
    lines = _lines(texts)
    if sample == "head":
        return [line for _, line in zip(range(max_sentences), lines)]
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if i < max_sentences:
            reservoir.append((i, line))
        else:
            j = rng.randrange(i + 1)
            if j < max_sentences:
                reservoir[j] = (i, line)
    reservoir.sort()
    return [line for _, line in reservoir]


def train_tokenizer(
    inputs: list[Path],
    model_prefix: Path,
    *,
    vocab_size: int = 8000,
    max_sentences: int = 2_000_000,
    user_symbols: Sequence[str] = (),
    seed: int = 0,
    text_key: str = "text",
    num_threads: int = 1,
    sample: Literal["reservoir", "head"] = "reservoir",
) -> Path:
    """Train a SentencePiece BPE model (byte fallback) on the ``text_key`` field of JSONL files.

    Deterministic: the training lines are a seeded sample (see the module docstring) and the
    trainer's seed is fixed; one thread by default (more threads are faster but not guaranteed
    bit-identical).

    Args:
        inputs: JSONL files (plain or gzip) or directories of them.
        model_prefix: writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``.
        vocab_size: total vocabulary, specials and the 256 byte pieces included.
        max_sentences: cap on training lines (a sample of the corpus when it has more).
        user_symbols: extra pieces that are always kept whole (``"\\n"`` is always added).
        seed: SentencePiece's random seed and the line sampler's.
        text_key: the JSONL field with the text.
        num_threads: trainer threads.
        sample: ``"reservoir"`` or ``"head"`` (see :func:`sample_lines`).

    Returns:
        The ``.model`` path.

    Raises:
        ValueError: the inputs hold no text.
    """
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = sample_lines(iter_jsonl_texts(inputs, text_key=text_key), max_sentences, sample=sample, seed=seed)
    if not lines:
        raise ValueError(f"no text found under '{text_key}' in {[str(p) for p in inputs]}")
    symbols = ["\n", *(s for s in user_symbols if s != "\n")]
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=MAX_TRAIN_LINE_BYTES * 2,
        user_defined_symbols=symbols,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model_prefix.with_name(model_prefix.name + ".model")


class TokenizerConfig(Config):
    """Settings of :func:`train_tokenizer` (the ``tokenizer`` section of a data run)."""

    vocab_size: int = Field(8000, ge=300)
    """Total vocabulary, specials and the 256 byte pieces included (match the model's ``vocab_size``)."""
    max_sentences: int = Field(2_000_000, ge=1)
    """Training lines; a larger corpus is sampled (see ``sample``)."""
    sample: Literal["reservoir", "head"] = "reservoir"
    """``reservoir``: a seeded uniform sample of all lines of the corpus; ``head``: the first lines."""
    user_symbols: list[str] = Field(default_factory=list)
    """Extra pieces always kept whole (``"\\n"`` is always one), e.g. chat or code markers."""
    seed: int = 0
    """Seed of the line sampler and of SentencePiece."""
    num_threads: int = Field(1, ge=1)
    """Trainer threads (1 is bit-reproducible)."""
    model: str | None = None
    """An existing ``.model`` to use instead of training one."""

    def train(self, inputs: list[Path], model_prefix: Path, *, text_key: str = "text") -> Path:
        """Train on ``inputs`` (or return :attr:`model`); returns the ``.model`` path."""
        if self.model:
            if not Path(self.model).is_file():
                raise FileNotFoundError(f"tokenizer.model: {self.model} does not exist")
            return Path(self.model)
        return train_tokenizer(
            inputs,
            model_prefix,
            vocab_size=self.vocab_size,
            max_sentences=self.max_sentences,
            user_symbols=self.user_symbols,
            seed=self.seed,
            text_key=text_key,
            num_threads=self.num_threads,
            sample=self.sample,
        )


class SentencePieceTokenizer:
    """A SentencePiece model with the interface megatron-core's ``GPTDataset`` expects.

    Attributes:
        model_path: the ``.model`` file.
        sha256: hex digest of the model file.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        data = self.model_path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=data)

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size - 1``)."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id (``</s>``, the same as :attr:`eos`)."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Padding id."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        """Unknown-piece id."""
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """JSON-able identity used by megatron-core to key its dataset index caches."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model_path": str(self.model_path.resolve()),
            "model_sha256": self.sha256,
            "vocab_size": self.vocab_size,
        }

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, in order, encoded by ``num_threads`` SentencePiece threads."""
        return self._sp.encode(texts, num_threads=max(1, num_threads)) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (exact inverse of :meth:`encode`)."""
        return self._sp.decode([int(i) for i in ids])

    def tokenize(self, text: str) -> list[int]:
        """Alias of :meth:`encode` (megatron's name)."""
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Alias of :meth:`decode` (megatron's name)."""
        return self.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of ``token_id``."""
        return self._sp.id_to_piece(int(token_id))
