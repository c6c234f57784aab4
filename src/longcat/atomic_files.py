"""Write a file so that readers see the old content or the new, never a half-written one.

Everything longcat writes outside checkpoints (configs, manifests, metrics rewrites, tokenizers,
generated data) goes through here: write a temporary file beside the target, then ``os.replace``
it (atomic on POSIX within one file system). On any failure the temporary file is removed and the
target is left as it was.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    Creates the parent directory.
    Raises:
        OSError: the directory or file cannot be written (e.g. ``path`` is a directory); the
            temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_file():
            tmp.unlink()


@contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` for writing (text modes as UTF-8), replacing ``path`` only on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8), atomically."""
    with atomic_open(path) as f:
        f.write(text)
