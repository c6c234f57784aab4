"""The embedded agentic SFT set: multi-turn tool-use dialogues whose tools really ran on this machine.

The LongCat-Flash report (arXiv 2509.01322, data pipeline) lists synthetic multi-turn tool dialogues among the
post-training data; this is a stand-in of that shape, small enough to run the SFT recipe offline on CPU. Every
tool message is the string ``agentic_tools.run_tool`` returned for the call's arguments (searching and reading
the default corpus's stdlib files, a calculator, date arithmetic), and every final answer is computed from
those results, so the data holds no invented fact. ``tools/make_agentic_sft.py`` writes the set as
``messages`` JSONL (read by ``longcat.data.sft``); ``default_sft_records()`` is the set of the default size
and seed, used by ``data.sft_path=builtin``.

Templates (one per conversation, taken in turn in the order listed, so their shares are as equal as
the count allows: fewer conversations than templates use only the first ones; the conversations are
then shuffled; a quarter open with a system message; ``random.Random(seed)`` makes every choice):

- calculator: one call, the calling turn without text;
- calculator_rounds: a two-step word problem, then a second user round answered by two parallel calls;
- dates: one of date_diff / add_days / weekday;
- dates_parallel: two weekdays and the gap between the dates, three parallel calls in one turn;
- find_and_read: search_files for a module, then read_file of its first lines (a two-step chain);
- find_definition: search_files, then search_text for a class or function (a two-step chain); or,
  half of them, search_text in a file the user names and a second round reading on with read_file;
- package_listing: search_files over one package's directory;
- compare_files: read_file of two files in parallel to compare their lengths;
- recover_from_error: read_file of a wrong path returns an error; search_files, then read_file;
- no_tool: tools are offered but the two rounds need none.

Same seed on the same machine (interpreter and stdlib) -> identical records.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import posixpath
import random
import re
from fractions import Fraction
from typing import Callable, NamedTuple

from longcat.atomic_files import atomic_open
from longcat.data.agentic_tools import (
    TOOLS,
    corpus_files,
    corpus_lines,
    run_tool,
    tool_specs,
)
from longcat.data.chat import parse_conversation, render_text

DEFAULT_NUM_CONVERSATIONS = 70
DEFAULT_SEED = 0
SYSTEM_FRACTION = 0.25
# Rendered, with its system message if any. The stdlib tokenizer (vocab 8192) makes 3.3 characters a
# token on this text (2.9 at worst), so the SFT recipe (seq_length 512) drops no conversation.
MAX_RENDERED_CHARS = 1600
_MAX_DRAWS = 50
_SYSTEM = "You are a helpful assistant. Use the tools when they help."
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_WORDS = ("tokenizer", "gradient", "expert", "router", "checkpoint", "pipeline", "attention", "optimizer")
_GOODS = (("boxes", "pens"), ("crates", "apples"), ("packs", "cards"), ("shelves", "books"), ("trays", "cups"))
_NUMBERED = re.compile(r"^(\d+): (.*)$")
_TOTAL = re.compile(r": lines \d+-\d+ of (\d+)$")
_CUT = re.compile(r" \[\+(\d+) chars\]$")  # agentic_tools._cut's mark


class _Redraw(Exception):
    """Raised by a template whose random choice does not make a good question; the template is drawn again."""


class GeneratedConversation(NamedTuple):
    template: str
    record: dict  # {"tools": [spec, ...], "messages": [...]}


class _Dialogue:
    """Builds one ``messages`` record; ``call`` runs the tools for real and records their results."""

    def __init__(self, *tool_names: str):
        self.tools = tool_specs(*tool_names)
        self.messages: list[dict] = []

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def call(self, text: str | None, *calls: tuple[str, dict], error_expected: bool = False) -> list[str]:
        """An assistant turn with ``calls`` (parallel when several); returns the tools' results.

        Raises:
            _Redraw: when a result is an error and ``error_expected`` is False (e.g. an empty file).
        """
        self.messages.append({"role": "assistant", "content": text, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in calls]})
        results = [run_tool(name, arguments) for name, arguments in calls]
        if any(r.startswith("error:") for r in results) != error_expected:
            raise _Redraw
        self.messages.extend({"role": "tool", "content": result} for result in results)
        return results

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def record(self) -> dict:
        return {"tools": self.tools, "messages": self.messages}


# ---------------------------------------------------------------------------------------------
# Reading tool results (the answers are computed from what the tools returned)


def _numbered_lines(result: str) -> list[tuple[int, str]]:
    """(line number, text) of each ``N: text`` line of a read_file or search_text result."""
    return [(int(m[1]), m[2]) for m in map(_NUMBERED.match, result.split("\n")) if m]


def _total_lines(result: str) -> int:
    header = _TOTAL.search(result.split("\n", 1)[0])
    assert header is not None, f"read_file result without its ': lines A-B of N' header: {result[:80]!r}"
    return int(header[1])


def _listed_paths(result: str) -> list[str]:
    """The paths listed by a search_files result (without its header and ``... (K more)`` line)."""
    return [line for line in result.split("\n")[1:] if not line.startswith("... (")]


def _quote(text: str) -> str:
    """A result line in backticks, saying so when the tool cut it (``... [+N chars]``)."""
    m = _CUT.search(text)
    if m:
        return f"`{text[: m.start()].strip()}` (cut; {m[1]} more characters)"
    return f"`{text.strip()}`"


def _first_nonempty(lines: list[tuple[int, str]]) -> str:
    found = [(n, text) for n, text in lines if text.strip()]
    if not found:
        return f"lines {lines[0][0]}-{lines[-1][0]} are empty"
    n, text = found[0]
    return f"line {n} is {_quote(text)}" if n == lines[0][0] else f"the first non-empty line is {n}: {_quote(text)}"


def _long_date(iso: str) -> str:
    year, month, day = map(int, iso.split("-"))
    return f"{_MONTHS[month - 1]} {day}, {year}"


def _random_date(rng: random.Random) -> str:
    return f"{rng.randint(1990, 2035):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


# ---------------------------------------------------------------------------------------------
# Choosing files (questions may use any knowledge; answers only the tool results)


@functools.lru_cache(maxsize=1)
def _unique_modules() -> tuple[str, ...]:
    """Corpus files in a package whose file name occurs once in the corpus (a search finds just it)."""
    names = collections.Counter(posixpath.basename(p) for p in corpus_files())
    return tuple(p for p in corpus_files() if "/" in p and names[posixpath.basename(p)] == 1
                 and not posixpath.basename(p).startswith("__"))


@functools.lru_cache(maxsize=1)
def _packages() -> tuple[str, ...]:
    """Directories holding at least two corpus files directly."""
    counts = collections.Counter(posixpath.dirname(p) for p in corpus_files())
    return tuple(sorted(d for d, n in counts.items() if d and n >= 2))


def _module_name(path: str) -> str:
    return path[: -len(".py")].replace("/", ".")


def _definitions(path: str) -> list[tuple[str, str]]:
    """(kind, query) for each top-level class or function of ``path``: ("class", "class Foo(")."""
    found = []
    for line in corpus_lines(path):
        m = re.match(r"(class|def) (\w+)[(:]", line)
        if m:
            found.append((m[1], line[: m.end()]))
    return found


# ---------------------------------------------------------------------------------------------
# Templates: each takes the rng and returns a record


def _calculator(rng: random.Random) -> dict:
    a, b, c, p = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 30), rng.randint(2, 6)
    # (expression, its exact value): the answer says "about" when the tool's 12 digits round it
    expression, exact = rng.choice([
        (f"{a} + {b} * {c}", a + b * c), (f"({a} + {b}) * {c}", (a + b) * c), (f"{a} * {b} - {c}", a * b - c),
        (f"{a} // {c}", a // c), (f"{a} % {c}", a % c), (f"{a} / {c}", Fraction(a, c)), (f"{c} ** {p}", c ** p),
        (f"({a} - {b}) / {c}", Fraction(a - b, c))])
    chat = _Dialogue("calculator")
    chat.user(rng.choice(["What is {}?", "Compute {}.", "Can you work out {} for me?"]).format(expression))
    [value] = chat.call(None, ("calculator", {"expression": expression}))
    if Fraction(value) == exact:
        chat.answer(f"{expression} = {value}.")
    else:
        chat.answer(f"{expression} is about {value} (rounded to 12 significant digits).")
    return chat.record()


def _calculator_rounds(rng: random.Random) -> dict:
    containers, items = rng.choice(_GOODS)
    a, b, c, k = rng.randint(6, 48), rng.randint(3, 20), rng.randint(2, 9), rng.randint(3, 7)
    chat = _Dialogue("calculator")
    chat.user(f"I have {b} {containers} of {a} {items} and give away {c} {items}. How many are left?")
    [total] = chat.call(f"First the total number of {items}.", ("calculator", {"expression": f"{b} * {a}"}))
    [left] = chat.call(None, ("calculator", {"expression": f"{total} - {c}"}))
    chat.answer(f"You had {total} {items}, so {left} are left after giving away {c}.")
    chat.user(f"If I share them equally among {k} friends, how many does each get and how many remain?")
    each, remain = chat.call("Dividing with remainder.", ("calculator", {"expression": f"{left} // {k}"}),
                             ("calculator", {"expression": f"{left} % {k}"}))
    chat.answer(f"Each of the {k} friends gets {each} {items}, and {remain} remain.")
    return chat.record()


def _dates(rng: random.Random) -> dict:
    kind, day = rng.choice(["date_diff", "add_days", "weekday"]), _random_date(rng)
    chat = _Dialogue(kind)
    if kind == "date_diff":
        other = _random_date(rng)
        chat.user(f"How many days are there from {_long_date(day)} to {_long_date(other)}?")
        [days] = chat.call(None, ("date_diff", {"start": day, "end": other}))
        later = "after" if int(days) >= 0 else "before"
        chat.answer(f"{_long_date(other)} is {abs(int(days))} days {later} {_long_date(day)}.")
    elif kind == "add_days":
        n = rng.choice([7, 30, 45, 90, 100, 180, 365, 1000, -10, -100])
        phrase = f"{n} days after" if n > 0 else f"{-n} days before"
        chat.user(f"Which date is {phrase} {day}?")
        [date] = chat.call(None, ("add_days", {"date": day, "days": n}))
        chat.answer(f"{phrase.capitalize()} {_long_date(day)} is {_long_date(date)} ({date}).")
    else:
        chat.user(f"What day of the week is {_long_date(day)}?")
        [name] = chat.call(None, ("weekday", {"date": day}))
        chat.answer(f"{_long_date(day)} falls on a {name}.")
    return chat.record()


def _dates_parallel(rng: random.Random) -> dict:
    first, second = sorted([_random_date(rng), _random_date(rng)])
    if first == second:
        raise _Redraw
    chat = _Dialogue("weekday", "date_diff")
    chat.user(f"On which weekdays do {first} and {second} fall, and how many days apart are they?")
    day1, day2, days = chat.call("I'll look up both weekdays and the gap at once.",
                                 ("weekday", {"date": first}), ("weekday", {"date": second}),
                                 ("date_diff", {"start": first, "end": second}))
    chat.answer(f"{_long_date(first)} is a {day1} and {_long_date(second)} a {day2}; the second comes "
                f"{days} days after the first.")
    return chat.record()


def _find_and_read(rng: random.Random) -> dict:
    path = rng.choice(_unique_modules())
    name = posixpath.basename(path)
    chat = _Dialogue("search_files", "read_file")
    chat.user(f"How long is the {_module_name(path)} module, and how does it start?")
    [found] = chat.call(None, ("search_files", {"pattern": name}))
    [found_path] = _listed_paths(found)
    [excerpt] = chat.call(f"It is {found_path}; reading its first lines.",
                          ("read_file", {"path": found_path, "num_lines": 3}))
    chat.answer(f"{found_path} has {_total_lines(excerpt)} lines; {_first_nonempty(_numbered_lines(excerpt))}.")
    return chat.record()


def _find_definition(rng: random.Random) -> dict:
    path = rng.choice(_unique_modules())
    if not _definitions(path):
        raise _Redraw
    kind, query = rng.choice(_definitions(path))
    symbol = query.split()[1][:-1]
    what = f"{'class' if kind == 'class' else 'function'} {symbol}"
    read_on = rng.random() < 0.5
    if read_on:  # the user names the file, and a second round reads on from the definition
        chat = _Dialogue("search_text", "read_file")
        chat.user(f"On which line of {path} is the {what} defined?")
        found_path = path
    else:  # a two-step chain: find the module's file, then the definition in it
        chat = _Dialogue("search_files", "search_text")
        chat.user(f"Where is the {what} of {_module_name(path)} defined?")
        [found] = chat.call(None, ("search_files", {"pattern": posixpath.basename(path)}))
        [found_path] = _listed_paths(found)
    [hits] = chat.call(None, ("search_text", {"query": query, "path": found_path}))
    definitions = [(n, text) for n, text in _numbered_lines(hits) if text.startswith(query)]
    if not definitions:  # only mentions within the listed hits
        raise _Redraw
    line, text = definitions[0]
    chat.answer(f"{symbol} is defined on line {line} of {found_path}" + ("." if read_on else f": {_quote(text)}"))
    if read_on:
        chat.user("What comes right after it?")
        [excerpt] = chat.call(None, ("read_file", {"path": found_path, "start_line": line + 1, "num_lines": 2}))
        shown = [(n, t) for n, t in _numbered_lines(excerpt) if t.strip()]
        if not shown:  # blank lines
            raise _Redraw
        chat.answer("; ".join(f"{'Line' if k == 0 else 'line'} {n} is {_quote(t)}"
                              for k, (n, t) in enumerate(shown)) + ".")
    return chat.record()


def _package_listing(rng: random.Random) -> dict:
    package = rng.choice(_packages())
    chat = _Dialogue("search_files")
    chat.user(f"Which Python files are there under {package}/?")
    [found] = chat.call(None, ("search_files", {"pattern": "*.py", "directory": package}))
    paths = _listed_paths(found)
    total = int(found.split()[0])
    names = ", ".join(p[len(package) + 1:] for p in paths)
    shown = f"these {len(paths)}" if len(paths) == total else f"the search listed the first {len(paths)}"
    chat.answer(f"There are {total} Python files under {package}/; {shown}: {names}.")
    return chat.record()


def _compare_files(rng: random.Random) -> dict:
    package = rng.choice(_packages())
    first, second = rng.sample([p for p in corpus_files() if posixpath.dirname(p) == package], 2)
    chat = _Dialogue("read_file")
    chat.user(f"Which file is longer, {first} or {second}?")
    results = chat.call("Reading the first line of each; the header gives the length.",
                        ("read_file", {"path": first, "num_lines": 1}), ("read_file", {"path": second, "num_lines": 1}))
    n1, n2 = map(_total_lines, results)
    if n1 == n2:
        chat.answer(f"Neither: both have {n1} lines.")
    else:
        (longer, n_long), (shorter, n_short) = sorted([(first, n1), (second, n2)], key=lambda x: -x[1])
        chat.answer(f"{longer} is longer: {n_long} lines against {n_short} in {shorter}, {n_long - n_short} more.")
    return chat.record()


def _recover_from_error(rng: random.Random) -> dict:
    path = rng.choice([p for p in _unique_modules() if len(p) <= 24])  # the path recurs: keep it short
    name = posixpath.basename(path)
    chat = _Dialogue("read_file", "search_files")
    chat.user(f"Show me the first lines of {name}.")
    chat.call(None, ("read_file", {"path": name}), error_expected=True)
    [found] = chat.call("Not at the root; searching for it.", ("search_files", {"pattern": name}))
    [found_path] = _listed_paths(found)
    [excerpt] = chat.call(None, ("read_file", {"path": found_path, "num_lines": 2}))
    chat.answer(f"The file is {found_path} ({_total_lines(excerpt)} lines); "
                f"{_first_nonempty(_numbered_lines(excerpt))}.")
    return chat.record()


def _no_tool(rng: random.Random) -> dict:
    names = rng.sample(sorted(TOOLS), 2)
    chat = _Dialogue(*names)
    chat.user(rng.choice(["Hi! What can you help me with?", "Hello, what tools do you have?"]))
    chat.answer("I can call these tools: " + "; ".join(
        f"{spec['name']} - {spec['description'][0].lower()}{spec['description'][1:].rstrip('.')}"
        for spec in chat.tools) + ".")
    word, n, path = rng.choice(_WORDS), rng.randint(2, 500), rng.choice(corpus_files())
    question, answer = rng.choice([
        (f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters."),
        (f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."),
        (f"Is {n} an even number?", f"{'Yes' if n % 2 == 0 else 'No'}, {n} is {'even' if n % 2 == 0 else 'odd'}."),
        (f"What is the file name in the path {path}?", f"The file name is {posixpath.basename(path)}."),
    ])
    chat.user(f"Thanks. {question}")
    chat.answer(answer)
    return chat.record()


TEMPLATES: dict[str, Callable[[random.Random], dict]] = {
    "calculator": _calculator, "calculator_rounds": _calculator_rounds, "dates": _dates,
    "dates_parallel": _dates_parallel, "find_and_read": _find_and_read, "find_definition": _find_definition,
    "package_listing": _package_listing, "compare_files": _compare_files,
    "recover_from_error": _recover_from_error, "no_tool": _no_tool,
}


# ---------------------------------------------------------------------------------------------
# The set


def generate_conversations(num_conversations: int = DEFAULT_NUM_CONVERSATIONS, *,
                           seed: int = DEFAULT_SEED) -> list[GeneratedConversation]:
    """``num_conversations`` tool-use dialogues in a seeded order, the templates taken in turn.

    Conversation k uses template k % len(TEMPLATES) (the TEMPLATES order) before the shuffle, so the
    shares are as equal as the count allows and a count below len(TEMPLATES) uses only the first ones.

    A template draws again when its random choice makes no good question (a file without
    definitions, an empty file), the conversation fails ``chat.parse_conversation`` (a file
    excerpt holding a reserved chat marker), or it renders to more than MAX_RENDERED_CHARS.

    Raises:
        ValueError: for num_conversations < 1.
    """
    if num_conversations < 1:
        raise ValueError(f"num_conversations={num_conversations} must be >= 1")
    rng = random.Random(seed)
    names = [list(TEMPLATES)[k % len(TEMPLATES)] for k in range(num_conversations)]
    rng.shuffle(names)
    generated = []
    for name in names:
        with_system = rng.random() < SYSTEM_FRACTION
        for _ in range(_MAX_DRAWS):
            try:
                record = TEMPLATES[name](rng)
            except _Redraw:
                continue
            if with_system:
                record["messages"].insert(0, {"role": "system", "content": _SYSTEM})
            try:
                text = render_text(parse_conversation(record)).text
            except ValueError:  # a reserved chat marker in a file excerpt
                continue
            if len(text) <= MAX_RENDERED_CHARS:
                break
        else:
            raise AssertionError(f"template {name} produced no valid conversation in {_MAX_DRAWS} draws")
        generated.append(GeneratedConversation(name, record))
    return generated


@functools.lru_cache(maxsize=1)
def _default_records() -> tuple[dict, ...]:
    return tuple(c.record for c in generate_conversations())


def default_sft_records() -> list[dict]:
    """The embedded set: ``generate_conversations()`` with the default size and seed, as records (a copy)."""
    return copy.deepcopy(list(_default_records()))


def write_jsonl(path: str, *, records: list[dict]) -> int:
    """Write ``records`` to ``path``, one JSON object per line, atomically; return the count.

    Creates the parent directory. On failure the temporary file is removed and ``path`` is untouched.

    Raises:
        OSError: when the directory or file cannot be written (e.g. ``path`` is a directory).
    """
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def write_default_sft_jsonl(path: str) -> int:
    """Write ``default_sft_records()`` to ``path`` (atomically); return the count."""
    return write_jsonl(path, records=default_sft_records())
