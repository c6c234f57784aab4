"""Reading a run's ``metrics.jsonl`` and the helpers every figure shares."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

__all__ = ["layers_with", "read_metrics", "save_figure", "series"]

logger = logging.getLogger(__name__)
_LAYER_KEY = re.compile(r"^moe/layer(\d+)/(.+)$")


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics JSONL file, one JSON object a line.

    A last line that is not valid JSON (torn by a crash, or read while being written) is skipped
    with a warning; a bad line anywhere else is an error.

    Raises:
        ValueError: naming FILE:LINE of a bad line (malformed JSON before the last line, or JSON that
            is not an object), or when the file holds no records.
    """
    with open(path) as f:
        lines = [(lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from None
            logger.warning("%s:%d: skipped the torn last line (%s), as a crash mid-write leaves it",
                           path, lineno, exc.msg)
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: not a metrics record: JSON {type(record).__name__}, "
                             "expected an object")
        if not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{lineno}: a metrics record needs an integer \"step\", got {record.get('step')!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no metrics records; run training first")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding a number under ``key``."""
    steps, values = [], []
    for r in records:
        if isinstance(r.get(key), (int, float)):
            steps.append(r["step"])
            values.append(r[key])
    return steps, values


def layers_with(records: list[dict], suffix: str) -> list[int]:
    """The MoE layers L with a ``moe/layer{L}/{suffix}`` metric, ascending."""
    found = set()
    for r in records:
        for key in r:
            m = _LAYER_KEY.match(key)
            if m and m.group(2) == suffix:
                found.add(int(m.group(1)))
    return sorted(found)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) and close it."""
    import matplotlib.pyplot as plt  # lazily: plot_all selects the Agg backend first

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
