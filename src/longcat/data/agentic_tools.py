"""Real tools for the embedded agentic SFT set: every tool result in the data is what these return here.

The file tools work on the default corpus, the stdlib ``.py`` files of ``corpus.stdlib_source_files``,
addressed by their path relative to the stdlib root (``json/decoder.py``); the others are a safe
calculator and date arithmetic. Each tool is a plain function returning a short string (file
excerpts are capped, and every cut is stated in the result), with a JSON-schema spec in ``TOOLS``.
``run_tool`` is the dispatcher a dialogue uses: a ``ValueError`` of a tool (a bad expression, a path
outside the corpus, an unknown argument) becomes the result ``error: ...``, as an agent would see it.
"""

from __future__ import annotations

import ast
import copy
import datetime
import fnmatch
import functools
import math
import operator
import posixpath
from typing import Any, Callable, NamedTuple

from longcat.data.corpus import read_source, stdlib_root, stdlib_source_files

MAX_MATCHES = 10  # search_files / search_text list at most this many paths or lines
MAX_READ_LINES = 10
MAX_LINE_CHARS = 72  # longer lines are cut, with the cut stated
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
MAX_INT_DIGITS = 100
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class Tool(NamedTuple):
    spec: dict  # {"name", "description", "parameters": JSON schema}
    function: Callable[..., str]


# ---------------------------------------------------------------------------------------------
# The default corpus's files


corpus_root = stdlib_root  # the folder the file tools read: the default corpus's


@functools.lru_cache(maxsize=1)
def corpus_files() -> tuple[str, ...]:
    """Relative POSIX paths of the default corpus's files, sorted (``stdlib_source_files`` order)."""
    root = corpus_root()
    return tuple(p.relative_to(root).as_posix() for p in stdlib_source_files())


def corpus_lines(path: str) -> tuple[str, ...]:
    """The lines of corpus file ``path`` (relative), as ``read_file`` sees them.

    Raises:
        ValueError: as ``read_file`` for a path outside the corpus.
    """
    return _file_lines(_corpus_path(path))


@functools.lru_cache(maxsize=64)
def _file_lines(path: str) -> tuple[str, ...]:
    # Decoded as the corpus decodes it (read_source). Lines end at
    # \n, \r\n or \r only, as an editor counts them (str.splitlines also splits at form feeds).
    text = read_source(corpus_root() / path)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return tuple(lines)


def _corpus_path(path: str) -> str:
    """``path`` normalized to a corpus file's relative path.

    Raises:
        ValueError: for an absolute path or one leaving the root, or no such corpus file.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    normalized = posixpath.normpath(path)
    if posixpath.isabs(normalized) or normalized == ".." or normalized.startswith("../"):
        raise ValueError(f"path {path!r} is outside the corpus root; give a path like 'json/decoder.py'")
    if normalized not in _corpus_file_set():
        raise ValueError(f"no corpus file {path!r}; search_files lists the paths")
    return normalized


@functools.lru_cache(maxsize=1)
def _corpus_file_set() -> frozenset[str]:
    return frozenset(corpus_files())


def _cut(line: str) -> str:
    line = line.rstrip()
    if len(line) <= MAX_LINE_CHARS:
        return line
    return f"{line[:MAX_LINE_CHARS]} [+{len(line) - MAX_LINE_CHARS} chars]"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# File tools


def search_files(pattern: str, *, directory: str = "") -> str:
    """Corpus files under ``directory`` matching the glob ``pattern``, sorted, at most MAX_MATCHES listed.

    The pattern is matched against the file name (like ``find -name``), or, when it holds a ``/``,
    against the path relative to ``directory``.

    Raises:
        ValueError: for an empty pattern or a directory outside the corpus root.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty glob such as '*.py', got {pattern!r}")
    if not isinstance(directory, str):
        raise ValueError(f"directory must be a string, got {directory!r}")
    base = posixpath.normpath(directory) if directory else "."
    if posixpath.isabs(base) or base == ".." or base.startswith("../"):
        raise ValueError(f"directory {directory!r} is outside the corpus root; give one like 'json'")
    prefix = "" if base == "." else base + "/"
    matches = []
    for path in corpus_files():
        if not path.startswith(prefix):
            continue
        relative = path[len(prefix):]
        subject = relative if "/" in pattern else posixpath.basename(relative)
        if fnmatch.fnmatchcase(subject, pattern):
            matches.append(path)
    where = f"{pattern!r} under {base!r}"
    if not matches:
        return f"no files match {where}"
    count = f"{len(matches)} files match" if len(matches) != 1 else "1 file matches"
    lines = [f"{count} {where}:", *matches[:MAX_MATCHES]]
    if len(matches) > MAX_MATCHES:
        lines.append(f"... ({len(matches) - MAX_MATCHES} more)")
    return "\n".join(lines)


def read_file(path: str, *, start_line: int = 1, num_lines: int = 5) -> str:
    """Lines ``start_line .. start_line + num_lines - 1`` (1-based, at most MAX_READ_LINES) of a corpus file.

    The result opens with ``PATH: lines A-B of TOTAL``, numbers each line ``N: text``, cuts lines
    longer than MAX_LINE_CHARS and ends with ``... (K more lines)`` when the file goes on.

    Raises:
        ValueError: for a path outside the corpus, bad line numbers, or a start past the end.
    """
    path = _corpus_path(path)
    start_line = _positive_int(start_line, "start_line")
    num_lines = _positive_int(num_lines, "num_lines")
    if num_lines > MAX_READ_LINES:
        raise ValueError(f"num_lines={num_lines} exceeds the limit of {MAX_READ_LINES}; read in pieces")
    lines = _file_lines(path)
    if start_line > len(lines):
        raise ValueError(f"start_line={start_line} is past the end of {path} ({len(lines)} lines)")
    end = min(start_line + num_lines - 1, len(lines))
    out = [f"{path}: lines {start_line}-{end} of {len(lines)}"]
    out += [f"{n}: {_cut(lines[n - 1])}" for n in range(start_line, end + 1)]
    if end < len(lines):
        out.append(f"... ({len(lines) - end} more lines)")
    return "\n".join(out)


def search_text(query: str, *, path: str) -> str:
    """The lines of a corpus file containing ``query`` (case-sensitive), numbered, at most MAX_MATCHES.

    Raises:
        ValueError: for an empty query or a path outside the corpus.
    """
    if not isinstance(query, str) or not query:
        raise ValueError(f"query must be a non-empty string, got {query!r}")
    path = _corpus_path(path)
    hits = [(n, line) for n, line in enumerate(_file_lines(path), start=1) if query in line]
    if not hits:
        return f"no line of {path} contains {query!r}"
    count = f"{len(hits)} lines" if len(hits) != 1 else "1 line"
    out = [f"{count} of {path} contain{'s' if len(hits) == 1 else ''} {query!r}:"]
    out += [f"{n}: {_cut(line)}" for n, line in hits[:MAX_MATCHES]]
    if len(hits) > MAX_MATCHES:
        out.append(f"... ({len(hits) - MAX_MATCHES} more)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Calculator


_BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """The value of an arithmetic expression: numbers, ``+ - * / // % **`` and parentheses.

    Evaluated by walking its ``ast`` (never ``eval``). Integers stay exact; a float result is
    written with 12 significant digits (``7 / 2`` -> ``3.5``, ``10 / 4 * 2`` -> ``5``).

    Raises:
        ValueError: for anything else (names, calls, attributes, ...), division by zero, an exponent
            above MAX_EXPONENT, an integer over MAX_INT_DIGITS digits or a non-finite float.
    """
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty string, got {expression!r}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(expression)} characters exceeds {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r}: {e.msg}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    # Not bool: True is an int subclass but no number here (ast.parse makes no other subclass).
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} exceeds the limit of {MAX_EXPONENT}")
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result too large") from None
        if isinstance(value, complex):
            raise ValueError("a negative number to a fractional power has no real value")
        if isinstance(value, int) and abs(value) >= 10**MAX_INT_DIGITS:
            raise ValueError(f"integer result over {MAX_INT_DIGITS} digits")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("result too large")
        return value
    what = type(node).__name__
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = f"operator {type(node.op).__name__}"
    elif isinstance(node, ast.Constant):
        what = f"constant {node.value!r}"
    raise ValueError(f"unsupported {what}: only numbers, + - * / // % ** and parentheses are allowed")


# ---------------------------------------------------------------------------------------------
# Dates


def _date(text: str, name: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={text!r} is not a date YYYY-MM-DD") from None


def date_diff(start: str, *, end: str) -> str:
    """Days from ``start`` to ``end`` (ISO dates; negative when end is earlier), e.g. ``"299"``."""
    return str((_date(end, "end") - _date(start, "start")).days)


def add_days(date: str, *, days: int) -> str:
    """The ISO date ``days`` after ``date`` (before it when negative).

    Raises:
        ValueError: for a malformed date, non-integer days, or a result outside years 1..9999.
    """
    if isinstance(days, bool) or not isinstance(days, int):
        raise ValueError(f"days must be an integer, got {days!r}")
    try:
        return (_date(date, "date") + datetime.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ValueError(f"{date} + {days} days is outside years 1..9999") from None


def weekday(date: str) -> str:
    """The English weekday name of an ISO date, e.g. ``"Friday"``."""
    return _WEEKDAYS[_date(date, "date").weekday()]


# ---------------------------------------------------------------------------------------------
# Specs and dispatch


def _spec(name: str, description: str, required: dict, optional: dict | None = None) -> dict:
    properties = {**required, **(optional or {})}
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(required)}}


_STRING, _INTEGER = {"type": "string"}, {"type": "integer"}
TOOLS: dict[str, Tool] = {
    "search_files": Tool(_spec(
        "search_files", "Stdlib files whose name matches a glob such as 'json*.py'.",
        {"pattern": _STRING}, {"directory": _STRING}), search_files),
    "read_file": Tool(_spec(
        "read_file", "Numbered lines of a stdlib file (10 at most).",
        {"path": _STRING}, {"start_line": _INTEGER, "num_lines": _INTEGER}), read_file),
    "search_text": Tool(_spec(
        "search_text", "Numbered lines of a stdlib file that contain a string.",
        {"query": _STRING, "path": _STRING}), search_text),
    "calculator": Tool(_spec(
        "calculator", "Arithmetic with numbers, + - * / // % ** and parentheses.",
        {"expression": _STRING}), calculator),
    "date_diff": Tool(_spec(
        "date_diff", "Days from start to end (YYYY-MM-DD).", {"start": _STRING, "end": _STRING}), date_diff),
    "add_days": Tool(_spec(
        "add_days", "The date some days after a date (YYYY-MM-DD).",
        {"date": _STRING, "days": _INTEGER}), add_days),
    "weekday": Tool(_spec("weekday", "The weekday of a date (YYYY-MM-DD).", {"date": _STRING}), weekday),
}


def tool_specs(*names: str) -> list[dict]:
    """Copies of the named tools' specs, in the given order (the ``tools`` field of a record)."""
    return [copy.deepcopy(TOOLS[name].spec) for name in names]


def run_tool(name: str, arguments: dict) -> str:
    """Call tool ``name`` with ``arguments``; a tool's ``ValueError`` becomes ``"error: ..."``.

    Arguments are checked against the spec first (unknown or missing names are errors, as a model
    can produce them). Raises nothing for bad input; ``KeyError`` only for a tool not in ``TOOLS``.
    """
    tool = TOOLS[name]
    parameters = tool.spec["parameters"]
    unknown = sorted(set(arguments) - set(parameters["properties"]))
    missing = [p for p in parameters["required"] if p not in arguments]
    if unknown or missing:
        return (f"error: {name} got unknown arguments {unknown} and lacks {missing}; "
                f"it takes {list(parameters['properties'])}")
    try:
        return tool.function(**arguments)
    except ValueError as e:
        return f"error: {e}"
