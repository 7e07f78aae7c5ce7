"""Instruction samples with the prompt masked out of the loss, packed or padded.

Each example is tokenized as ``prompt + response + eos`` with a per-token flag "is a response
token". A sample of ``seq_len + 1`` tokens becomes ``tokens = ids[:-1]``, ``labels = ids[1:]``,
``loss_mask = flags[1:]``: a position carries loss only when the token it predicts belongs to a
response, so no prompt token is ever a target. The samples are a map-style dataset for
:class:`pretrain.data.loader.SampleLoader` (same interface and resumable position as pretraining).

Packing puts examples back to back (consecutive samples share one boundary token, like Megatron's
GPT samples); padding gives each example its own sample (an example that is too long loses the start of its
prompt, so the response is kept; padded with ``pad_id`` and a zero mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrain.finetune.instructions import Example


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """``(ids, flags)``: prompt tokens flagged 0, response tokens and the closing eos flagged 1."""
    prompt = tokenizer.encode(example.prompt)
    response = [*tokenizer.encode(example.response), tokenizer.eos]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


class InstructionDataset:
    """Training samples from tokenized examples.

    Args:
        encoded: ``(ids, flags)`` per example (see :func:`encode_example`).
        seq_len: Tokens per sample.
        packing: Pack examples back to back, else one padded example per sample.
        pad_id: Token used for padding (never a target: its flag is 0).
    """

    def __init__(
        self,
        encoded: Sequence[tuple[list[int], list[int]]],
        seq_len: int,
        *,
        packing: bool = True,
        pad_id: int = 0,
    ) -> None:
        if not encoded:
            raise ValueError("no examples to build samples from")
        self.seq_len = seq_len
        width = seq_len + 1
        rows: list[tuple[list[int], list[int]]] = []
        if packing:
            ids = [t for e, _ in encoded for t in e]
            flags = [f for _, fl in encoded for f in fl]
            for start in range(0, max(len(ids) - 1, 1), seq_len):
                rows.append((ids[start : start + width], flags[start : start + width]))
        else:
            rows = [_fit(e, fl, width) for e, fl in encoded]
        self._ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self._flags = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (e, fl) in enumerate(rows):
            self._ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            self._flags[i, : len(fl)] = torch.tensor(fl, dtype=torch.float32)

    def __len__(self) -> int:
        return self._ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, flags = self._ids[i], self._flags[i]
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": flags[1:]}

    @property
    def target_tokens(self) -> int:
        """Number of positions that carry loss."""
        return int(self._flags[:, 1:].sum())


def _fit(ids: list[int], flags: list[int], width: int) -> tuple[list[int], list[int]]:
    """Shorten an example to ``width`` tokens by dropping the start of its prompt; when even the
    response does not fit, keep the last prompt token and the start of the response."""
    if len(ids) <= width:
        return ids, flags
    n_prompt = len(ids) - sum(flags)
    start = max(0, min(len(ids) - width, n_prompt - 1))
    return ids[start : start + width], flags[start : start + width]


def build_instruction_datasets(
    tokenizer, examples: list[Example], seq_len: int, *, packing: bool, eval_examples: int = 0
) -> tuple[InstructionDataset, InstructionDataset | None]:
    """Train (and held-out eval, from the first ``eval_examples`` examples) datasets."""
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    pad = tokenizer.pad if tokenizer.pad >= 0 else 0
    held, train = encoded[:eval_examples], encoded[eval_examples:]
    train_ds = InstructionDataset(train, seq_len, packing=packing, pad_id=pad)
    eval_ds = InstructionDataset(held, seq_len, packing=packing, pad_id=pad) if held else None
    return train_ds, eval_ds
