"""Greedy and beam-search translation with a detached flow, and BLEU/chrF per direction.

The decoder is re-run over the whole prefix each step (no cache): simple and exact, fine for
the short messages this platform's demo data holds.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.models.lego_mt import LegoFlow

logger = logging.getLogger(__name__)


def _src_tensor(rows: list[list[int]], eos: int, pad: int, max_len: int) -> Tensor:
    rows = [[*r[: max_len - 1], eos] for r in rows]
    n = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def greedy(flow: LegoFlow, src: Tensor, *, bos: int, eos: int, max_new: int) -> list[list[int]]:
    """Argmax decoding of a batch; returns the ids after ``bos``, up to (excluding) ``eos``."""
    memory = flow.encode(src)
    ys = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_new):
        nxt = flow.decode(memory, src, ys)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    out = []
    for row in ys[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def beam_search(
    flow: LegoFlow,
    src: Tensor,
    *,
    bos: int,
    eos: int,
    max_new: int,
    beam: int = 4,
    length_penalty: float = 1.0,
) -> tuple[list[int], float]:
    """Beam search for one sentence (``src`` is ``(1, s)``): ``(ids, summed log-prob)``.

    Finished hypotheses are ranked by ``logprob / len ** length_penalty``.
    """
    memory = flow.encode(src)
    hyps: list[tuple[list[int], float]] = [([bos], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_new):
        ys = torch.tensor([h for h, _ in hyps], dtype=torch.long, device=src.device)
        n = len(hyps)
        logp = flow.decode(memory.expand(n, -1, -1), src.expand(n, -1), ys)[:, -1].float().log_softmax(-1)
        scores = torch.tensor([s for _, s in hyps], device=src.device)[:, None] + logp
        top = scores.flatten().topk(min(beam * 2, scores.numel()))
        new: list[tuple[list[int], float]] = []
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            i, tok = divmod(flat, logp.shape[1])
            seq = [*hyps[i][0], tok]
            if tok == eos:
                finished.append((seq[1:-1], value))
            else:
                new.append((seq, value))
            if len(new) == beam:
                break
        hyps = new
        if len(finished) >= beam or not hyps:
            break
    finished.extend((h[1:], s) for h, s in hyps)

    def final(h: tuple[list[int], float]) -> float:
        return h[1] / max(1, len(h[0]) + 1) ** length_penalty

    return max(finished, key=final)


def translate_ids(
    flow: LegoFlow,
    rows: list[list[int]],
    *,
    tgt_tag: int,
    eos: int,
    beam: int = 1,
    max_len: int = 128,
    batch_size: int = 32,
    len_a: float = 2.0,
    len_b: int = 10,
) -> list[list[int]]:
    """Translate token-id rows; ``beam == 1`` is greedy (batched), else beam search per row.

    Outputs stop at ``min(max_len, len_a * source tokens + len_b)`` (fairseq's ``max_len_a/b``):
    without a cache every step re-runs the decoder, so a model that never says EOS would
    otherwise cost ``max_len ** 2`` per sentence. Greedy batches group rows of similar length.
    """
    pad = flow.cfg.pad_id
    out: list[list[int]] = [[] for _ in rows]

    def budget(n: int) -> int:
        return max(1, min(max_len, int(len_a * min(n + 1, max_len) + len_b)))

    if beam == 1:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            src = _src_tensor([rows[j] for j in chunk], eos, pad, max_len)
            hyps = greedy(flow, src, bos=tgt_tag, eos=eos, max_new=budget(max(len(rows[j]) for j in chunk)))
            for j, hyp in zip(chunk, hyps):  # rows are independent: cut each to its own budget
                out[j] = hyp[: budget(len(rows[j]))]
        return out
    for i, row in enumerate(rows):
        src = _src_tensor([row], eos, pad, max_len)
        out[i] = beam_search(flow, src, bos=tgt_tag, eos=eos, max_new=budget(len(row)), beam=beam)[0]
    return out


def check_languages(meta: dict[str, Any], *, src_lang: str | None, tgt_lang: str) -> list[str]:
    """Refuse a language the flow has no tag for; return notes for a group branch used outside
    its group's languages (allowed, any encoder pairs with any decoder, but untrained there)."""
    known = sorted(meta["lang_tags"])
    for side, lang in (("source", src_lang), ("target", tgt_lang)):
        if lang is not None and lang not in meta["lang_tags"]:
            raise ValueError(f"unknown {side} language {lang!r}; this flow knows {known}")
    notes = []
    groups = meta.get("groups") or {}
    for part, lang, kind in (
        (meta.get("encoder"), src_lang, "encoder"),
        (meta.get("decoder"), tgt_lang, "decoder"),
    ):
        if lang is not None and part in groups and lang not in groups[part]:
            notes.append(f"the {kind} branch {part!r} was trained on {groups[part]}, not on {lang!r}")
    return notes


def translate_texts(
    flow: LegoFlow,
    tokenizer: Any,
    texts: list[str],
    *,
    tgt_lang: str,
    meta: dict[str, Any],
    src_lang: str | None = None,
    beam: int = 1,
    max_len: int = 128,
) -> list[str]:
    """Translate ``texts`` into ``tgt_lang``. The source side carries no language tag in this
    model's data format (only the target tag starts the decoder), so ``src_lang`` is checked
    against the flow's languages and branches but does not change the input."""
    for note in check_languages(meta, src_lang=src_lang, tgt_lang=tgt_lang):
        logger.warning(note)
    rows = tokenizer.encode_batch(texts)
    ids = translate_ids(
        flow, rows, tgt_tag=meta["lang_tags"][tgt_lang], eos=meta["eos_id"], beam=beam, max_len=max_len
    )
    return [tokenizer.decode(r) for r in ids]


def read_heldout(
    heldout: Path, *, directions: list[str] | None = None, limit: int | None = None
) -> dict[str, list[dict[str, str]]]:
    """``{"de-en": [{"src_lang", "tgt_lang", "src", "tgt"}, ...]}`` from ``heldout.jsonl``, sorted
    by direction. ``limit`` keeps that many pairs per direction, evenly spaced through the file:
    the file is in English-message order, so its first pairs are mostly format strings."""
    heldout = Path(heldout)
    if not heldout.is_file():
        raise FileNotFoundError(f"{heldout}: no held-out pairs (written by `pretrain lego-mt data`)")
    by_dir: dict[str, list[dict]] = defaultdict(list)
    with heldout.open() as f:
        for line in f:
            r = json.loads(line)
            d = f"{r['src_lang']}-{r['tgt_lang']}"
            if directions is None or d in directions:
                by_dir[d].append(r)
    if limit is not None:
        for d, rows in by_dir.items():
            if len(rows) > limit:
                by_dir[d] = [rows[i * len(rows) // limit] for i in range(limit)]
    missing = sorted(set(directions or []) - set(by_dir))
    if missing:
        raise ValueError(f"{heldout}: no pairs for {missing}; it has {sorted(by_dir)}")
    return dict(sorted(by_dir.items()))


def score_pairs(
    flow: LegoFlow,
    tokenizer: Any,
    rows: list[dict[str, str]],
    *,
    meta: dict[str, Any],
    beam: int = 1,
    max_len: int = 128,
) -> dict[str, float]:
    """``{"bleu", "chrf", "n"}`` (sacrebleu corpus scores) of one direction's pairs."""
    import sacrebleu

    hyps = translate_texts(
        flow,
        tokenizer,
        [r["src"] for r in rows],
        src_lang=rows[0]["src_lang"],
        tgt_lang=rows[0]["tgt_lang"],
        meta=meta,
        beam=beam,
        max_len=max_len,
    )
    refs = [[r["tgt"] for r in rows]]
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, refs).score,
        "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
        "n": len(rows),
    }


def evaluate(
    flow: LegoFlow,
    tokenizer: Any,
    heldout: Path,
    *,
    meta: dict[str, Any],
    beam: int = 1,
    directions: list[str] | None = None,
    limit: int | None = None,
    max_len: int = 128,
) -> dict[str, dict[str, float]]:
    """``{"de-en": {"bleu", "chrf", "n"}}`` with sacrebleu on ``heldout.jsonl`` pairs."""
    by_dir = read_heldout(heldout, directions=directions, limit=limit)
    return {
        d: score_pairs(flow, tokenizer, rows, meta=meta, beam=beam, max_len=max_len)
        for d, rows in by_dir.items()
    }
