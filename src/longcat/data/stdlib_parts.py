"""Named parts of the embedded stdlib corpus, for stage mixtures (arXiv 2509.01322 §3: the mixture shifts
toward code in mid-training; long-context extension mixes in long documents).

A data source path ``stdlib:<part>`` names one part, tokenized with the stdlib corpus's tokenizer:

    stdlib:code   every source file, whole (the default corpus itself)
    stdlib:docs   the English prose of the stdlib: module, class and function docstrings of each file
    stdlib:long   only the longest tenth of the files (at least two: train and valid), whole: long-range documents

Each part is cached beside the corpus (``<cache>/stdlib_<part>.bin/.idx``) with a manifest tying it
to the tokenizer it was made with.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from longcat.atomic_files import write_text_atomic
from longcat.data.corpus import CorpusPaths, stdlib_source_files, tokenize_to_indexed
from longcat.data.tokenizer import load_tokenizer

PARTS = ("code", "docs", "long")
LONG_FILE_FRACTION = 0.1
PREFIX = "stdlib:"


def is_stdlib_part(path: str) -> bool:
    return str(path).startswith(PREFIX)


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                found.append(doc)
    return "\n\n".join(found)


def _part_texts(part: str, *, max_bytes: int) -> list[str]:
    files = stdlib_source_files(max_bytes=max_bytes)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if part == "docs":
        return [d for d in (_docstrings(t) for t in texts) if d]
    if part == "long":
        by_size = sorted(texts, key=lambda t: len(t.encode("utf-8")), reverse=True)
        return by_size[: max(2, int(len(texts) * LONG_FILE_FRACTION))]
    return texts


def resolve_stdlib_part(path: str, *, corpus: CorpusPaths, max_bytes: int, progress: bool = True) -> str:
    """The ``.bin/.idx`` prefix of ``stdlib:<part>``, built on first use.

    Raises:
        ValueError: an unknown part, or a part with no documents under ``max_bytes``.
    """
    part = str(path)[len(PREFIX):]
    if part not in PARTS:
        raise ValueError(f"unknown data source {path!r}: stdlib parts are {[PREFIX + p for p in PARTS]}")
    if part == "code":
        return corpus.prefix
    cache_dir = os.path.dirname(corpus.prefix)
    prefix = os.path.join(cache_dir, f"stdlib_{part}")
    with open(corpus.tokenizer_path, "rb") as f:
        expected = {"part": part, "tokenizer": hashlib.sha256(f.read()).hexdigest(), "max_bytes": max_bytes,
                    "long_file_fraction": LONG_FILE_FRACTION}
    manifest = Path(prefix + ".manifest.json")
    if manifest.is_file() and Path(prefix + ".bin").is_file() and json.loads(manifest.read_text()) == expected:
        return prefix
    texts = _part_texts(part, max_bytes=max_bytes)
    if not texts:
        raise ValueError(f"data source {path!r} has no documents with data.corpus_max_bytes={max_bytes}; "
                         "raise the cap or use 0")
    tokenize_to_indexed(texts, tokenizer=load_tokenizer(corpus.tokenizer_path), output_prefix=prefix,
                        append_eod=True, progress=progress)
    write_text_atomic(manifest, json.dumps(expected))
    return prefix
