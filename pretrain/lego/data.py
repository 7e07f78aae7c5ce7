"""Tokenized pair files of one language-centric group and deterministic batches over them.

``<data_dir>/<group>.jsonl`` holds one pair a line: ``{"src_lang", "tgt_lang", "src": [ids],
"tgt": [ids]}`` (token ids without specials; see ``data_pipeline.bitext``), and
``<data_dir>/meta.json`` holds ``{"lang_tags": {lang: id}, "eos_id", "pad_id"}``.

A batch is ``src = ids + [eos]``, ``tgt_in = [<2tgt>] + ids``, ``labels = ids + [eos]``,
right-padded. Stage 2 (Dec-Flow) trains the group's decoder branch, which writes the group's
language, so it reads the group's pairs reversed (``X -> group``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class Pair:
    src_lang: str
    tgt_lang: str
    src: list[int]
    tgt: list[int]


def read_meta(data_dir: Path, *, vocab_size: int | None = None) -> dict:
    """``data_dir/meta.json`` (language tags, eos/pad ids, tokenizer); with ``vocab_size`` (the
    model's) raise ValueError when the tokenizer has more pieces than the model has rows."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; write it with `pretrain lego-mt data`")
    meta = json.loads(path.read_text())
    if vocab_size is not None and meta.get("vocab_size", 0) > vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {meta['vocab_size']} "
            f"({path}); set model.vocab_size={meta['vocab_size']}"
        )
    return meta


def load_pairs(data_dir: Path, group: str, *, reverse: bool = False) -> list[Pair]:
    path = Path(data_dir) / f"{group}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenized pairs for group {group!r}")
    pairs = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            if reverse:
                pairs.append(Pair(r["tgt_lang"], r["src_lang"], r["tgt"], r["src"]))
            else:
                pairs.append(Pair(r["src_lang"], r["tgt_lang"], r["src"], r["tgt"]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def collate(pairs: list[Pair], meta: dict, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(src, tgt_in, labels)`` right-padded with ``pad_id``; sides cut to ``max_len`` tokens."""
    eos, pad, tags = meta["eos_id"], meta["pad_id"], meta["lang_tags"]
    srcs = [[*p.src[: max_len - 1], eos] for p in pairs]
    tgts = [p.tgt[: max_len - 1] for p in pairs]
    tgt_in = [[tags[p.tgt_lang], *t] for p, t in zip(pairs, tgts)]
    labels = [[*t, eos] for t in tgts]

    def pad_to(rows: list[list[int]]) -> Tensor:
        n = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long)

    return pad_to(srcs), pad_to(tgt_in), pad_to(labels)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of batch ``step``: consecutive slices of seeded per-epoch permutations, so any
    step's batch is a pure function of ``(n, batch_size, step, seed)`` (exact resume)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out
