"""English msgid -> translated msgstr pairs read from compiled gettext catalogs (``.mo``).

Every Debian/Ubuntu machine has thousands under ``/usr/share/locale/<lang>/LC_MESSAGES/``.
Messages shared by several catalogs (same English text) give a multi-way table: one English
sentence with its translation in each language, so any two languages form a pair.
"""

from __future__ import annotations

import gettext
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCALE_ROOT = Path("/usr/share/locale")


def catalog_files(lang: str, root: Path = LOCALE_ROOT) -> list[Path]:
    """The ``.mo`` files of ``lang`` (exact directory name, e.g. ``de`` or ``pt_BR``), sorted."""
    return sorted((Path(root) / lang / "LC_MESSAGES").glob("*.mo"))


def iter_catalog(path: Path) -> Iterator[tuple[str, str]]:
    """``(msgid, msgstr)`` of one catalog: header skipped, context stripped, plural forms as
    their singular (``msgstr[0]``). An unreadable catalog yields nothing (and is logged)."""
    try:
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("skipping %s: %s", path, exc)
        return
    for key, value in catalog.items():
        if isinstance(key, tuple):
            if key[1] != 0:
                continue
            key = key[0]
        if not key or not isinstance(value, str):
            continue
        yield key.rsplit("\x04", 1)[-1], value


def multiway_table(
    langs: list[str],
    *,
    normalize: Callable[[str], str],
    root: Path = LOCALE_ROOT,
    pivot: str = "en",
) -> dict[str, dict[str, str]]:
    """``{english: {lang: translation, pivot: english}}`` over every catalog of ``langs``.

    A message translated differently in several catalogs keeps its most frequent translation
    (ties: the smallest string), so the table is deterministic.
    """
    votes: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for lang in langs:
        if lang == pivot:
            continue
        for path in catalog_files(lang, root):
            for msgid, msgstr in iter_catalog(path):
                src, tgt = normalize(msgid), normalize(msgstr)
                if src and tgt:
                    votes[src][lang][tgt] += 1
    table: dict[str, dict[str, str]] = {}
    for src in sorted(votes):
        row = {pivot: src}
        for lang, counter in votes[src].items():
            row[lang] = min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        table[src] = row
    return table
