"""Renders the reference of every config key (type, default, doc) as Markdown, from the config
classes themselves, so the README's reference cannot drift from the code."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(annotation: object) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for junk in ("typing.", "NoneType"):
        text = text.replace(junk, "None" if junk == "NoneType" else "")
    return text


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_reference(cls: type[BaseModel], prefix: str = "") -> str:
    """Markdown: one table of scalar keys per section, sections in declaration order."""
    rows, sections = [], []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(field.annotation):
            sections.append((key, typing.cast(type[BaseModel], field.annotation)))
            continue
        default = (
            field.get_default(call_default_factory=True)
            if field.default is PydanticUndefined
            else field.default
        )
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{key}` | `{type_name}` | `{default!r}` | {doc} |")
    out = []
    if rows:
        title = prefix.rstrip(".") or "top level"
        out += [f"#### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for key, section in sections:
        out.append(config_reference(section, f"{key}."))
    return "\n".join(out)


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_section(text: str) -> str:
    """The generated part of a README (between the config-reference markers)."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def update_readme(path: str) -> None:
    """Rewrite the config reference between the markers of the README at ``path``."""
    from pathlib import Path

    from pretrain.run_config import RunConfig

    text = Path(path).read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    Path(path).write_text(f"{head}{START}\n{config_reference(RunConfig).strip()}\n{END}{tail}")


if __name__ == "__main__":
    import sys

    update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
