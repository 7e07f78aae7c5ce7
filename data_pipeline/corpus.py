"""A small, real English + code corpus available on every machine: the Python standard library.

Each module, class and function docstring becomes a prose document and each source file a code
document. Used by the quickstart and by tests; no download needed.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

#: Directory names under the stdlib that hold tests, vendored wheels or third-party packages.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled", "turtledemo"}
)


def _stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside :data:`SKIP_DIRS`, sorted by relative path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test_")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath, name))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` for the module and every class/function, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "<module>", doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                text = ast.get_docstring(child, clean=True)
                if text:
                    yield qualname, text
                yield from visit(child, qualname + ".")

    yield from visit(tree, "")


def iter_stdlib_documents(root: Path | None = None, *, min_chars: int = 50) -> Iterator[dict]:
    """Yield ``{"id", "text", "source"}`` records from the standard library, deterministically.

    For each file (sorted by path): its docstrings (``source="python-stdlib:docstring"``,
    ``id="<path>::<qualname>"``) then the file itself (``source="python-stdlib:code"``,
    ``id="<path>"``). Files that are not UTF-8 or not parseable are skipped.

    Args:
        root: the stdlib directory (default: ``sysconfig.get_paths()["stdlib"]``).
        min_chars: documents shorter than this (e.g. ``"Return self."``) are skipped.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=rel)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for qualname, doc in _docstrings(tree):
            if len(doc) >= min_chars:
                yield {"id": f"{rel}::{qualname}", "text": doc, "source": "python-stdlib:docstring"}
        if len(source) >= min_chars:
            yield {"id": rel, "text": source, "source": "python-stdlib:code"}


def build_stdlib_corpus(out_path: Path, *, max_bytes: int = 8_000_000, min_chars: int = 50) -> dict:
    """Write the standard-library corpus to ``out_path`` as JSONL (written to a temp name, then renamed).

    Stops before the first document whose text would take the total past ``max_bytes`` (UTF-8
    bytes of text, not counting JSON overhead), so the output is a deterministic prefix.

    Args:
        out_path: the ``.jsonl`` file to write (parent directories are created).
        max_bytes: budget of text bytes.
        min_chars: skip documents shorter than this.

    Returns:
        ``{"documents": n, "bytes": m}`` where ``m`` counts text bytes.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    n_docs = n_bytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in iter_stdlib_documents(min_chars=min_chars):
            size = len(record["text"].encode("utf-8"))
            if n_bytes + size > max_bytes:
                break
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n_docs += 1
            n_bytes += size
    os.replace(tmp, out_path)
    return {"documents": n_docs, "bytes": n_bytes}
