"""Typed configuration: the base class every component config derives from, YAML loading,
dotted ``--set a.b=c`` overrides and error messages that name the key and the file.

Every component keeps its own small config next to its code (``TransNormerConfig`` beside the
model, ``CheckpointConfig`` beside the checkpointer); ``pretrain.run_config.RunConfig`` only
composes them. Validation happens when the config is built, before any work starts.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the source and the fix."""


class Config(BaseModel):
    """Base of all configs: unknown keys are errors, assignments are validated, and each
    field's attribute docstring is its documentation (shown by ``pretrain config``)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, protected_namespaces=()
    )

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-able dict of every field (defaults included)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "<dict>") -> C:
        """Validate ``data``; on failure raise :class:`ConfigError` naming every bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(cls, exc, source)) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
        """Load ``path`` and apply ``overrides`` (``a.b=c`` strings, values parsed as YAML)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
        source = str(path)
        if overrides:
            data = apply_overrides(data, overrides)
            source = f"{path} (with --set {' '.join(overrides)})"
        return cls.from_dict(data, source=source)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied; ``value`` is parsed as YAML
    so ``train.lr=3e-4`` is a float and ``data.paths=[a,b]`` a list."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the repeatable ``--set KEY=VALUE`` option; the values collect in ``args.overrides``
    (for :meth:`Config.from_yaml`, which applies them with :func:`apply_overrides`)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _field_names(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at ``loc`` (the parent of the bad key), for 'did you mean'."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def format_validation_error(cls: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            valid = _field_names(cls, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(str(p) for p in (*loc[:-1], hint[0]))}'?)"
            if valid:
                msg += f"; valid keys here: {', '.join(valid)}"
            lines.append(f"  - {msg}")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - key '{key}': {err['msg']}{got_s}")
    return "\n".join(lines)
