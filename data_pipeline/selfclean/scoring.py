"""Per-document perplexity under a causal LM, batched, as a datatrove step.

A document's score is ``exp(mean NLL)`` of its tokens: the text is encoded, the end-of-document
id is put in front (the model saw it before every document in training, so the first token is
predicted from a document boundary), the sequence is cut into windows of ``window`` predicted
tokens, each window is scored from an empty state, and the token NLLs of all windows are averaged.
Windows from many documents are sorted by length and batched (right padding cannot change a causal
model's earlier positions; padded positions are masked out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

#: Metadata keys written by the scorer.
PPL_KEY, TOKENS_KEY = "perplexity", "perplexity_tokens"


def windows_of(ids: list[int], window: int) -> list[list[int]]:
    """Cut ``ids`` (boundary token first) into windows of at most ``window + 1`` tokens that
    overlap by one, so every token after the first is predicted exactly once."""
    return [ids[i : i + window + 1] for i in range(0, max(len(ids) - 1, 1), window)]


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: list[list[int]], device: torch.device) -> list[float]:
    """Summed next-token NLL of each window (its first token is context only)."""
    longest = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), longest, dtype=torch.long)
    mask = torch.zeros(len(windows), longest - 1)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w)
        mask[row, : len(w) - 1] = 1.0
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids[:, :-1]).float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(mask.shape)
    return (nll * mask).sum(dim=1).tolist()


def score_token_lists(
    model: torch.nn.Module,
    docs: list[list[int]],
    *,
    window: int,
    batch_windows: int,
    device: torch.device | str = "cpu",
) -> list[tuple[float, int]]:
    """``(perplexity, predicted tokens)`` of each token list (boundary token first).

    A list with nothing to predict scores ``(inf, 0)``.
    """
    device = torch.device(device)
    items = [(doc_i, w) for doc_i, ids in enumerate(docs) for w in windows_of(ids, window) if len(w) > 1]
    items.sort(key=lambda item: len(item[1]))
    sums = [0.0] * len(docs)
    counts = [0] * len(docs)
    for start in range(0, len(items), batch_windows):
        chunk = items[start : start + batch_windows]
        for (doc_i, w), total in zip(chunk, window_nll(model, [w for _, w in chunk], device)):
            sums[doc_i] += total
            counts[doc_i] += len(w) - 1
    return [(math.exp(min(s / n, 700.0)) if n else math.inf, n) for s, n in zip(sums, counts)]


class PerplexityScorer(PipelineStep):
    """Score documents with an evaluation model; adds ``perplexity`` and ``perplexity_tokens`` metadata.

    The model is loaded once per task; each task also writes its perplexities, in document order,
    to ``scores_dir/<rank>.npy`` (float64) for the round's threshold and histogram. Counts
    ``scored``, ``tokens`` and ``unscorable`` (nothing to predict, perplexity ``inf``).

    Args:
        checkpoint: a checkpoint, checkpoints directory or run directory.
        scores_dir: where the per-task score arrays go.
        window: tokens per window (``None``: the model's training ``data.seq_len``).
        max_tokens: score only the first this many tokens of a document.
        batch_windows: windows per forward pass.
        docs_per_batch: documents gathered before their windows are sorted and batched.
        threads: torch threads in the task.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    name = "🧮 perplexity scorer"
    type = "🔬 - SCORER"

    def __init__(
        self,
        checkpoint: str | Path,
        scores_dir: str | Path,
        *,
        window: int | None = None,
        max_tokens: int | None = None,
        batch_windows: int = 16,
        docs_per_batch: int = 256,
        threads: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        self.checkpoint, self.scores_dir = str(checkpoint), Path(scores_dir)
        self.window, self.max_tokens = window, max_tokens
        self.batch_windows, self.docs_per_batch = batch_windows, docs_per_batch
        self.threads, self.device = threads, device

    def _score(self, loaded, window: int, device: torch.device, batch: list[Document]) -> None:
        tok = loaded.tokenizer
        token_lists = []
        for doc in batch:
            ids = tok.encode(doc.text)
            token_lists.append([tok.eod, *(ids[: self.max_tokens] if self.max_tokens else ids)])
        scores = score_token_lists(
            loaded.model, token_lists, window=window, batch_windows=self.batch_windows, device=device
        )
        for doc, (ppl, n) in zip(batch, scores):
            doc.metadata[PPL_KEY], doc.metadata[TOKENS_KEY] = ppl, n
            self.stat_update("scored")
            self.stat_update("tokens", value=n)
            if n == 0:
                self.stat_update("unscorable")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from pretrain.inference import load_model
        from pretrain.trainer.train_module import resolve_device

        torch.set_num_threads(self.threads)
        device = resolve_device(self.device)
        loaded = load_model(self.checkpoint, device=device)
        window = self.window or training_seq_len(loaded.checkpoint)
        scores: list[float] = []
        batch: list[Document] = []

        def flush() -> Iterator[Document]:
            done = list(batch)
            batch.clear()
            with self.track_time(unit="batch"):
                self._score(loaded, window, device, done)
            scores.extend(d.metadata[PPL_KEY] for d in done)
            yield from done

        for doc in data or ():
            batch.append(doc)
            if len(batch) >= self.docs_per_batch:
                yield from flush()
        if batch:
            yield from flush()
        self.scores_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.scores_dir / f"{rank:05d}.tmp.npy"
        np.save(tmp, np.asarray(scores, dtype=np.float64))
        tmp.replace(self.scores_dir / f"{rank:05d}.npy")


def training_seq_len(checkpoint: Path, default: int = 256) -> int:
    """``data.seq_len`` of the run that wrote ``checkpoint`` (its saved ``config.yaml``)."""
    import yaml

    path = Path(checkpoint) / "config.yaml"
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        return int(data.get("data", {}).get("seq_len", default))
    return default
