"""Greedy and beam-search translation with a detached flow, and BLEU/chrF per direction.

The decoder is re-run over the whole prefix each step (no cache): simple and exact, fine for
the short messages this platform's demo data holds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.models.lego_mt import LegoFlow


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
) -> list[list[int]]:
    """Translate token-id rows; ``beam == 1`` is greedy (batched), else beam search per row."""
    pad = flow.cfg.pad_id
    out: list[list[int]] = []
    if beam == 1:
        for i in range(0, len(rows), batch_size):
            src = _src_tensor(rows[i : i + batch_size], eos, pad, max_len)
            out.extend(greedy(flow, src, bos=tgt_tag, eos=eos, max_new=max_len))
        return out
    for row in rows:
        src = _src_tensor([row], eos, pad, max_len)
        out.append(beam_search(flow, src, bos=tgt_tag, eos=eos, max_new=max_len, beam=beam)[0])
    return out


def translate_texts(
    flow: LegoFlow,
    tokenizer: Any,
    texts: list[str],
    *,
    tgt_lang: str,
    meta: dict[str, Any],
    beam: int = 1,
    max_len: int = 128,
) -> list[str]:
    if tgt_lang not in meta["lang_tags"]:
        raise ValueError(f"unknown target language {tgt_lang!r}; known: {sorted(meta['lang_tags'])}")
    rows = tokenizer.encode_batch(texts)
    ids = translate_ids(
        flow, rows, tgt_tag=meta["lang_tags"][tgt_lang], eos=meta["eos_id"], beam=beam, max_len=max_len
    )
    return [tokenizer.decode(r) for r in ids]


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
    import sacrebleu

    by_dir: dict[str, list[dict]] = defaultdict(list)
    with Path(heldout).open() as f:
        for line in f:
            r = json.loads(line)
            d = f"{r['src_lang']}-{r['tgt_lang']}"
            if (directions is None or d in directions) and (limit is None or len(by_dir[d]) < limit):
                by_dir[d].append(r)
    scores = {}
    for d, rows in sorted(by_dir.items()):
        hyps = translate_texts(
            flow,
            tokenizer,
            [r["src"] for r in rows],
            tgt_lang=rows[0]["tgt_lang"],
            meta=meta,
            beam=beam,
            max_len=max_len,
        )
        refs = [[r["tgt"] for r in rows]]
        scores[d] = {
            "bleu": sacrebleu.corpus_bleu(hyps, refs).score,
            "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
            "n": len(rows),
        }
    return scores
