"""Real text for calibrating language-model quantization, from what every install already has (no download,
no random tokens): the Python reference manual's topics (`pydoc_data`, shipped with CPython), the long
descriptions of the installed packages (READMEs of ~80 projects on many subjects: networking, imaging,
OCR, cryptography, testing...), and this project's own documentation.

Documents are split into calibration and held-out sets by a hash of their name, so the two never share a
document, and both mix all sources. `token_chunks` cuts a set into fixed-length token windows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT_SHARE = 4                 # one document in four is held out


@dataclass(frozen=True)
class Document:
    name: str
    source: str
    text: str


def _python_reference() -> list[Document]:
    import pydoc_data.topics as topics
    return [Document(f"pydoc:{k}", "python-reference", v) for k, v in sorted(topics.topics.items()) if len(v) > 400]


def _package_descriptions() -> list[Document]:
    import importlib.metadata as md
    docs, seen = [], set()
    for dist in md.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        if name in seen or not body or len(body) < 400:
            continue
        seen.add(name)
        docs.append(Document(f"pkg:{name}", "package-readme", body))
    return sorted(docs, key=lambda d: d.name)


def _project_docs() -> list[Document]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [Document(f"doc:{f.name}", "project-docs", f.read_text()) for f in files if f.is_file()]


def documents() -> list[Document]:
    return _python_reference() + _package_descriptions() + _project_docs()


def _held_out(doc: Document) -> bool:
    return int(hashlib.sha256(doc.name.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def split(docs: Iterable[Document] | None = None) -> tuple[list[Document], list[Document]]:
    """(calibration, held_out), interleaved across sources so any prefix is varied."""
    docs = list(docs if docs is not None else documents())
    cal = _interleave([d for d in docs if not _held_out(d)])
    held = _interleave([d for d in docs if _held_out(d)])
    return cal, held


def _interleave(docs: list[Document]) -> list[Document]:
    by_source: dict[str, list[Document]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    out, queues = [], [list(v) for v in by_source.values()]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def token_chunks(encode: Callable[[str], list[int]], docs: Iterable[Document], length: int, count: int,
                 per_document: int = 2) -> list[list[int]]:
    """Up to `count` windows of `length` tokens, at most `per_document` from each document (evenly spaced),
    taking documents in order until enough are gathered."""
    chunks: list[list[int]] = []
    for doc in docs:
        ids = encode(doc.text)
        if len(ids) < length:
            continue
        starts = sorted({round(i * (len(ids) - length) / max(per_document - 1, 1)) for i in range(per_document)})
        for s in starts[:per_document]:
            chunks.append(ids[s:s + length])
            if len(chunks) == count:
                return chunks
    return chunks
