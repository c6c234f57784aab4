"""``docs/benchmarks.md`` from every ``benchmarks/results/*.json``.

A result file may come from this suite (``BenchResult.to_json``: ``title``, ``tables``, ``notes``,
``metrics``, ``machine``) or from any other benchmark (the ScMoE overlap and SDC-check ones, a GPU
run). The generator needs nothing but a JSON object: it shows ``title`` (else the file name), the
file's ``tables`` when it has them (``{"title", "columns", "rows"}``), else one flat table of all
its numeric and boolean fields (nested keys joined with dots; ``machine`` and ``settings`` left
out), then its ``notes``. The machine section lists each distinct machine description.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

# Suite order first; any other result follows alphabetically.
ORDER = ("throughput", "utilisation", "memory", "scaling", "checkpoint")
SKIP_KEYS = ("machine", "settings", "version", "tables", "notes")
MACHINE_KEYS = ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "torch_version",
                "transformers_version", "python_version", "platform", "gpu", "cuda_version", "load_average_1m")


def format_value(value: Any) -> str:
    """Cells: bools as yes/no, floats to 4 significant digits, the rest as str (pipes escaped)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(format_value(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in rows]
    return lines


def flatten_numeric(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every number or bool in nested dicts/lists (top-level SKIP_KEYS left out)."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if not prefix and key in SKIP_KEYS:
                continue
            out += flatten_numeric(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += flatten_numeric(value, f"{prefix}{i}.")
    elif isinstance(data, (int, float, bool)):
        out.append((prefix.rstrip("."), data))
    return out


def load_results(results_dir: Path) -> dict[str, dict]:
    """``{stem: parsed JSON}`` of ``results_dir/*.json``, suite order first; unreadable files are skipped
    with a warning."""
    found = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            found[path.stem] = data
        else:
            logger.warning("skipping %s: not a JSON object", path)
    order = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(ORDER)), kv[0])))


def _machine_key(machine: dict) -> tuple:
    return tuple(str(machine.get(k)) for k in MACHINE_KEYS if k != "load_average_1m")


def _machine_section(results: dict[str, dict]) -> list[str]:
    machines: dict[tuple, tuple[dict, list[str]]] = {}
    for name, data in results.items():
        machine = data.get("machine")
        if isinstance(machine, dict) and machine:
            machines.setdefault(_machine_key(machine), (machine, []))[1].append(name)
    lines = ["## Machine", ""]
    if not machines:
        return lines + ["(no machine description in the result files)", ""]
    for machine, names in machines.values():
        if len(machines) > 1:
            lines += [f"Used by: {', '.join(names)}", ""]
        rows = [[k, machine[k]] for k in MACHINE_KEYS if k in machine]
        rows += [[k, v] for k, v in machine.items() if k not in MACHINE_KEYS]
        lines += markdown_table(["field", "value"], rows) + [""]
    return lines


def _result_section(name: str, data: dict) -> list[str]:
    title = data.get("title") or name.replace("_", " ").capitalize()
    lines = [f"## {title}", ""]
    meta = [f"`{name}.json`"]
    for key, label in (("mode", "mode"), ("created_utc", "run"), ("wall_s", "took")):
        if data.get(key):
            value = data[key]
            meta.append(f"{label} {value:.0f} s" if key == "wall_s" else f"{label} {value}")
    # The machine's load at the time makes noisy numbers recognisable.
    load = (data.get("machine") or {}).get("load_average_1m")
    if load is not None:
        meta.append(f"load average {load}")
    lines += [", ".join(meta), ""]
    tables = data.get("tables")
    if isinstance(tables, list) and tables:
        for table in tables:
            if not isinstance(table, dict) or "columns" not in table or "rows" not in table:
                continue
            lines += [f"**{table.get('title', '')}**", ""] if table.get("title") else []
            lines += markdown_table(table["columns"], table["rows"]) + [""]
    else:
        fields = flatten_numeric(data)
        lines += markdown_table(["metric", "value"], fields) if fields else ["(no numeric fields)"]
        lines.append("")
    for note in data.get("notes") or []:
        lines.append(f"- {note}")
    if data.get("notes"):
        lines.append("")
    return lines


def render(results: dict[str, dict]) -> str:
    """The whole markdown document for ``results`` (as from ``load_results``)."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `tools/bench.py` (`make bench`) from `benchmarks/results/*.json`; do not edit by hand. "
        "How to run and what each benchmark measures: `benchmarks/README.md`. "
        "Figures from a `--quick` run or a loaded machine are smoke-test numbers, not measurements.",
        "",
    ]
    if not results:
        lines += ["(no results yet: run `make bench`)", ""]
    else:
        lines += _machine_section(results)
        for name, data in results.items():
            lines += _result_section(name, data)
    return "\n".join(lines).rstrip() + "\n"


def write_report(results_dir: Path, docs_path: Path) -> Path:
    """Regenerate ``docs_path`` from ``results_dir/*.json``. Returns ``docs_path``."""
    docs_path = Path(docs_path)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text(render(load_results(results_dir)))
    return docs_path
