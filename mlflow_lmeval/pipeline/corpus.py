"""Documents for the embedded default corpus, read offline from what every Python install has:
the documentation topics in ``pydoc_data.topics`` and the docstrings of the standard library."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

SKIPPED_PACKAGES = {"test", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "tkinter"}


def pydoc_topics() -> Iterator[tuple[str, str]]:
    for name in sorted(topics):
        yield f"topic:{name}", topics[name]


def _docstrings(source: str) -> str:
    """The module docstring, then every class and function docstring, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return "\n\n".join(doc.strip() for doc in map(ast.get_docstring, nodes) if doc and doc.strip())


def stdlib_docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py")] + [p for p in root.glob("*/__init__.py")]
    for path in sorted(files):
        module = path.parent.name if path.name == "__init__.py" else path.stem
        if module in SKIPPED_PACKAGES or module.startswith("_"):
            continue
        try:
            text = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if len(text) >= 200:
            yield f"module:{module}", text


def builtin_documents() -> list[tuple[str, str]]:
    """(name, text) pairs, in a fixed order."""
    return list(pydoc_topics()) + list(stdlib_docstrings())


def chunk_words(text: str, document_words: int, prefix: str) -> list[tuple[str, str]]:
    """Consecutive documents of about ``document_words`` words, cut at paragraph ends."""
    documents, current, count = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= document_words:
            documents.append("\n\n".join(current))
            current, count = [], 0
    if current and "".join(current).strip():
        documents.append("\n\n".join(current))
    return [(f"{prefix}:{index:05d}", doc) for index, doc in enumerate(documents) if doc.strip()]


def text_file_documents(path: Path, document_words: int) -> list[tuple[str, str]]:
    return chunk_words(path.read_text(encoding="utf-8", errors="replace"), document_words, prefix=path.stem)


def is_heldout(name: str, heldout_fraction: float, seed: int) -> bool:
    """A stable split: depends only on the document name and the seed, not on the order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction
