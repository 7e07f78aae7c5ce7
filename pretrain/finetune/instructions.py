"""x-LLaMA instruction mixtures (arXiv 2308.04948): prompt templates and the mixture builder.

A mixture has three parts, all rendered with the same instruction prompt:

1. English general instructions (``{"instruction", "input", "output"}`` JSONL);
2. the same instructions translated into language X (same schema, one file per language);
3. translation pairs as instructions, **always with the non-English side as the target**
   (the paper's finding: non-English text on the target side matters most), the instruction
   phrased by :data:`TRANSLATION_TEMPLATES` in rotation.

Only the response is trained on: the prompt tokens are masked out of the loss by
:mod:`pretrain.finetune.data`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError

PROMPT_WITH_INPUT = (
    "Below is an instruction describing a task, together with an input that gives more context. "
    "Write a response that completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction describing a task. Write a response that completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TRANSLATION_TEMPLATES = (
    "Translate the following text from {src} into {tgt}.",
    "What does the following {src} text say in {tgt}?",
    "Give the {tgt} translation of this {src} text.",
    "Render the text below in {tgt}.",
    "Convert this {src} passage into {tgt}.",
    "Please translate the sentences below into {tgt}.",
)
"""Translation instructions, used in rotation (example ``i`` of a language uses ``i % 6``)."""

LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "ar": "Arabic", "el": "Greek", "hi": "Hindi", "tr": "Turkish",
    "vi": "Vietnamese", "fr": "French", "de": "German", "es": "Spanish", "ru": "Russian", "ja": "Japanese",
}  # fmt: skip


@dataclass(frozen=True)
class Example:
    """One instruction example: the prompt (masked out of the loss) and the response."""

    prompt: str
    response: str
    kind: str
    """``general``, ``translated`` or ``translation``."""
    lang: str


def render_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction prompt, with or without an input block."""
    if input_text.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input_text.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


def translation_example(src: str, tgt: str, lang: str, index: int, names: dict[str, str]) -> Example:
    """English ``src`` -> ``tgt`` in ``lang``, with the ``index``-th template in rotation."""
    template = TRANSLATION_TEMPLATES[index % len(TRANSLATION_TEMPLATES)]
    instruction = template.format(src=names.get("en", "English"), tgt=names.get(lang, lang))
    return Example(render_prompt(instruction, src), tgt.strip(), "translation", lang)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"{path}: instruction file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def _instruction_examples(path: Path, kind: str, lang: str) -> list[Example]:
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise ConfigError(f"{path}: line {n} needs string 'instruction' and 'output' fields")
        out.append(
            Example(
                render_prompt(row["instruction"], row.get("input") or ""), row["output"].strip(), kind, lang
            )
        )
    return out


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_mixture(config: Any) -> tuple[list[Example], dict[str, Any]]:
    """Build the shuffled mixture an :class:`~pretrain.finetune.config.InstructionDataConfig`
    describes.

    Returns:
        ``(examples, summary)``; the summary (files with sha256, counts per part and language)
        is recorded in every checkpoint's lineage.
    """
    names = {**LANGUAGE_NAMES, **config.language_names}
    examples: list[Example] = []
    files: dict[str, str] = {}
    if config.english:
        examples += _instruction_examples(Path(config.english), "general", "en")
        files[str(config.english)] = _file_sha256(Path(config.english))
    for lang, path in sorted(config.translated.items()):
        examples += _instruction_examples(Path(path), "translated", lang)
        files[str(path)] = _file_sha256(Path(path))
    for lang, path in sorted(config.bitext.items()):
        if lang == "en":
            raise ConfigError(
                "instructions.bitext: key 'en' given; key each file by its non-English language"
            )
        for n, row in enumerate(_read_jsonl(Path(path))):
            if not isinstance(row.get("en"), str) or not isinstance(row.get(lang), str):
                raise ConfigError(f"{path}: line {n + 1} needs string 'en' and {lang!r} fields")
            examples.append(translation_example(row["en"], row[lang], lang, n, names))
        files[str(path)] = _file_sha256(Path(path))
    random.Random(config.seed).shuffle(examples)
    if config.max_examples:
        examples = examples[: config.max_examples]
    counts: dict[str, int] = {}
    for ex in examples:
        key = f"{ex.kind}/{ex.lang}"
        counts[key] = counts.get(key, 0) + 1
    summary = {
        "kind": "instructions",
        "files": files,
        "counts": dict(sorted(counts.items())),
        "seed": config.seed,
    }
    return examples, summary
