"""The agentic SFT tools against independent computations, and the generated set replayed against them."""

import collections
import datetime
import json
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest

from longcat.data.agentic_samples import (
    DEFAULT_NUM_CONVERSATIONS,
    TEMPLATES,
    default_sft_records,
    generate_conversations,
    write_jsonl,
)
from longcat.data.agentic_tools import (
    MAX_LINE_CHARS,
    TOOLS,
    add_days,
    calculator,
    corpus_files,
    corpus_root,
    date_diff,
    read_file,
    run_tool,
    search_files,
    search_text,
    weekday,
)
from longcat.data.chat import (
    Role,
    render_conversation,
    render_text,
    with_chat_special_tokens,
)
from longcat.data.corpus import stdlib_source_files, train_bpe_tokenizer
from longcat.data.sft import load_conversations

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(REPO, "tools", "make_agentic_sft.py")
GENERATED = generate_conversations()


def file_lines(path):
    """The lines of a corpus file, read independently: text-mode universal newlines."""
    with open(corpus_root() / path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\r\n") for line in f]


def cut(line):
    line = line.rstrip()
    return line if len(line) <= MAX_LINE_CHARS else f"{line[:MAX_LINE_CHARS]} [+{len(line) - MAX_LINE_CHARS} chars]"


# ---------------------------------------------------------------------------------------------
# File tools


def test_corpus_files_are_the_default_corpus():
    root = corpus_root()
    assert list(corpus_files()) == [p.relative_to(root).as_posix() for p in stdlib_source_files()]
    assert "json/decoder.py" in corpus_files() and not any(p.startswith("test/") for p in corpus_files())


def test_search_files_matches_a_glob_over_the_directory():
    root = corpus_root()
    expected = sorted(p.relative_to(root).as_posix() for p in (root / "json").rglob("*.py"))
    header = f"{len(expected)} files match '*.py' under 'json':"
    assert search_files("*.py", directory="json") == "\n".join([header, *expected])
    assert search_files("decoder.py") == "1 file matches 'decoder.py' under '.':\njson/decoder.py"
    assert search_files("json/*.py").split("\n")[1:] == expected  # a '/' matches the relative path
    assert search_files("*.nothing") == "no files match '*.nothing' under '.'"
    everything = search_files("*.py").split("\n")
    assert everything[0] == f"{len(stdlib_source_files())} files match '*.py' under '.':"
    assert everything[1:11] == list(corpus_files()[:10]) and everything[11] == f"... ({len(corpus_files()) - 10} more)"
    for directory in ("..", "../lib", "/usr", "json/../.."):
        with pytest.raises(ValueError, match="outside the corpus root"):
            search_files("*.py", directory=directory)


@pytest.mark.parametrize("path", ["json/decoder.py", "os.py", "email/mime/text.py"])
def test_read_file_matches_the_file(path):
    lines = file_lines(path)
    for start, count in [(1, 5), (3, 1), (len(lines) - 2, 10)]:
        end = min(start + count - 1, len(lines))
        result = read_file(path, start_line=start, num_lines=count).split("\n")
        assert result[0] == f"{path}: lines {start}-{end} of {len(lines)}"
        assert result[1:end - start + 2] == [f"{n}: {cut(lines[n - 1])}" for n in range(start, end + 1)]
        assert result[end - start + 2:] == ([f"... ({len(lines) - end} more lines)"] if end < len(lines) else [])


def test_read_file_line_count_of_every_corpus_file():
    for path in corpus_files():
        lines = file_lines(path)
        if lines:
            assert read_file(path, num_lines=1).split("\n")[0] == f"{path}: lines 1-1 of {len(lines)}", path


def test_read_file_refuses_paths_outside_the_corpus():
    root_name = corpus_root().name
    for path in ("../os.py", f"../{root_name}/os.py", "json/../../os.py", "/etc/passwd", str(corpus_root() / "os.py")):
        with pytest.raises(ValueError, match="outside the corpus root"):
            read_file(path)
    for path in ("test/test_os.py", "site-packages/pip/__init__.py", "decoder.py", "json"):
        with pytest.raises(ValueError, match="no corpus file"):
            read_file(path)
    assert read_file("json/../os.py", num_lines=1) == read_file("os.py", num_lines=1)  # normalized, inside the root
    with pytest.raises(ValueError, match="past the end"):
        read_file("json/decoder.py", start_line=100_000)
    with pytest.raises(ValueError, match="exceeds the limit"):
        read_file("json/decoder.py", num_lines=11)
    with pytest.raises(ValueError, match="start_line must be an integer >= 1"):
        read_file("json/decoder.py", start_line=0)


def test_search_text_matches_the_file():
    path, query = "json/decoder.py", "def "
    hits = [(n, line) for n, line in enumerate(file_lines(path), start=1) if query in line]
    result = search_text(query, path=path).split("\n")
    assert result[0] == f"{len(hits)} lines of {path} contain 'def ':"
    assert result[1:11] == [f"{n}: {cut(line)}" for n, line in hits[:10]]
    assert result[11:] == ([f"... ({len(hits) - 10} more)"] if len(hits) > 10 else [])
    assert search_text("no such text at all", path=path) == f"no line of {path} contains 'no such text at all'"


# ---------------------------------------------------------------------------------------------
# Calculator and dates


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * 4", 2 + 3 * 4), ("(2 + 3) * 4", (2 + 3) * 4), ("7 // 2", 7 // 2), ("-7 % 3", -7 % 3),
    ("2 ** 10", 2 ** 10), ("7 / 2", 7 / 2), ("10 / 4 * 2", 10 / 4 * 2), ("1 / 3", 1 / 3), ("2 ** -2", 2 ** -2),
    ("-(4 - 10) * +3", -(4 - 10) * +3), ("1.5 * 4", 1.5 * 4), ("9 ** 100", 9 ** 100),
    ("123456789 * 987654321", 123456789 * 987654321),
])
def test_calculator_known_values(expression, value):
    assert calculator(expression) == (f"{value:.12g}" if isinstance(value, float) else str(value))


def test_calculator_random_integer_expressions():
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = rng.randint(-999, 999), rng.randint(1, 99), rng.randint(1, 30)
        assert calculator(f"{a} * {b} - {c}") == str(a * b - c)
        assert calculator(f"({a} + {b}) // {c}") == str((a + b) // c)
        assert calculator(f"{a} % {c} + {b} ** 3") == str(a % c + b ** 3)


@pytest.mark.parametrize("expression, problem", [
    ("x + 1", "unsupported Name"), ("__import__('os')", "unsupported Call"), ("abs(-1)", "unsupported Call"),
    ("(1).real", "unsupported Attribute"), ("[1, 2]", "unsupported List"), ("'a' * 3", "unsupported constant 'a'"),
    ("True + 1", "unsupported constant True"), ("1j * 2", "unsupported constant 1j"),
    ("1 < 2", "unsupported Compare"), ("3 & 1", "unsupported operator BitAnd"), ("not 1", "unsupported operator Not"),
    ("lambda: 1", "unsupported Lambda"), ("2 ** 1000", "exponent 1000 exceeds"),
    ("(10 ** 60) * (10 ** 60)", "over 100 digits"), ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
    ("10.0 ** 99 * 10.0 ** 99 * 10.0 ** 99 * 10.0 ** 99", "too large"), ("(-8) ** 0.5", "no real value"),
    ("1 +", "cannot parse"), ("", "non-empty"), ("1" * 201, "exceeds 200"),
])
def test_calculator_rejects_everything_else(expression, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        calculator(expression)
    assert run_tool("calculator", {"expression": expression}).startswith("error: ")


def test_dates_against_datetime():
    assert weekday("2000-01-01") == "Saturday" and weekday("1970-01-01") == "Thursday"
    assert date_diff("2024-01-01", end="2025-01-01") == "366" and date_diff("2023-03-01", end="2023-02-01") == "-28"
    assert add_days("2024-02-28", days=1) == "2024-02-29" and add_days("2024-03-01", days=-1) == "2024-02-29"
    rng = random.Random(1)
    for _ in range(200):
        start = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 20000))
        end = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 20000))
        days = rng.randint(-5000, 5000)
        assert date_diff(start.isoformat(), end=end.isoformat()) == str((end - start).days)
        assert add_days(start.isoformat(), days=days) == (start + datetime.timedelta(days=days)).isoformat()
        # Ordinal 1 of the proleptic Gregorian calendar, 0001-01-01, is a Monday.
        assert ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"][
            (start.toordinal() - 1) % 7] == weekday(start.isoformat())
    for bad in ("2024-02-30", "24-1-1", "yesterday"):
        with pytest.raises(ValueError, match="is not a date YYYY-MM-DD"):
            weekday(bad)
    with pytest.raises(ValueError, match="outside years 1..9999"):
        add_days("9999-12-31", days=1)
    with pytest.raises(ValueError, match="days must be an integer"):
        add_days("2024-01-01", days="3")


def test_run_tool_checks_arguments():
    assert run_tool("weekday", {"date": "2000-01-01"}) == "Saturday"
    assert run_tool("weekday", {"day": "2000-01-01"}).startswith("error: weekday got unknown arguments ['day'] and "
                                                                 "lacks ['date']")
    assert run_tool("read_file", {"path": "../os.py"}).startswith("error: path '../os.py' is outside the corpus root")
    for name, tool in TOOLS.items():
        assert tool.spec["name"] == name and set(tool.spec["parameters"]["required"]) <= set(
            tool.spec["parameters"]["properties"])


# ---------------------------------------------------------------------------------------------
# The generated set


def tool_exchanges(record):
    """(call, result) pairs of a record: each assistant's calls paired with the tool messages after it."""
    messages, pairs = record["messages"], []
    for k, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        results = messages[k + 1:k + 1 + len(calls)]
        assert all(r["role"] == "tool" for r in results) and len(results) == len(calls)
        pairs += zip([c["function"] for c in calls], [r["content"] for r in results])
    assert len(pairs) == sum(m["role"] == "tool" for m in messages)
    return pairs


def test_every_tool_result_is_what_the_tool_returns(tmp_path):
    path = str(tmp_path / "set.jsonl")
    write_jsonl(path, records=[c.record for c in GENERATED])
    with open(path) as f:
        records = [json.loads(line) for line in f]  # through JSON, as training reads them
    num_calls = 0
    for record in records:
        for call, result in tool_exchanges(record):
            assert call["name"] in {t["name"] for t in record["tools"]}
            assert result == run_tool(call["name"], call["arguments"]), (call, result)
            num_calls += 1
    assert num_calls > len(records)


def test_answers_state_true_line_counts():
    claims = 0
    for conversation in GENERATED:
        for message in conversation.record["messages"]:
            if message["role"] == "assistant" and message["content"]:
                for path, count in re.findall(r"(\S+\.py) (?:has |\()(\d+) lines", message["content"]):
                    assert int(count) == len(file_lines(path)), message["content"]
                    claims += 1
    assert claims >= 14


def test_generation_is_deterministic_and_seeded():
    again = generate_conversations()
    assert [c.record for c in again] == [c.record for c in GENERATED]
    assert default_sft_records() == [c.record for c in GENERATED]
    records = default_sft_records()
    records[0]["messages"].clear()
    assert default_sft_records()[0]["messages"]  # a copy each call
    other = generate_conversations(seed=1)
    assert [c.record for c in other] != [c.record for c in GENERATED]
    twice = [[c.record for c in generate_conversations(12, seed=5)] for _ in range(2)]
    assert twice[0] == twice[1]
    with pytest.raises(ValueError, match="num_conversations=0 must be >= 1"):
        generate_conversations(0)


def test_mixture_of_templates():
    assert len(GENERATED) == DEFAULT_NUM_CONVERSATIONS
    counts = {name: sum(c.template == name for c in GENERATED) for name in TEMPLATES}
    assert set(counts.values()) == {DEFAULT_NUM_CONVERSATIONS // len(TEMPLATES)}
    turns = [m for c in GENERATED for m in c.record["messages"] if m.get("tool_calls")]
    assert any(len(m["tool_calls"]) >= 2 for m in turns)  # parallel calls
    assert any(m["content"] is None for m in turns) and any(m["content"] for m in turns)
    assert any(sum(m["role"] == "user" for m in c.record["messages"]) >= 2 and tool_exchanges(c.record)
               for c in GENERATED)  # a second user round in a tool dialogue
    no_tool = [c.record for c in GENERATED if c.template == "no_tool"]
    assert all(r["tools"] and not tool_exchanges(r) for r in no_tool)
    assert any(r.startswith("error:") for c in GENERATED for _, r in tool_exchanges(c.record))


def test_calculator_answers_say_about_for_a_rounded_value():
    """"=" only when the tool's value is exact; a rounded one (12 digits) is "about" that same value."""
    kinds = set()
    for seed in range(80):
        messages = TEMPLATES["calculator"](random.Random(seed))["messages"]
        value, answer = messages[-2]["content"], messages[-1]["content"]  # the tool's result, the answer
        expression = answer.split(" = " if " = " in answer else " is about ")[0]
        exact = eval(re.sub(r"\d+", lambda m: f"Fraction({m[0]})", expression), {"Fraction": Fraction})
        if Fraction(value) == exact:
            assert answer == f"{expression} = {value}."
            kinds.add("exact")
        else:
            assert answer == f"{expression} is about {value} (rounded to 12 significant digits)."
            assert abs(Fraction(value) - exact) <= abs(exact) * Fraction(1, 10 ** 11)
            kinds.add("rounded")
    assert kinds == {"exact", "rounded"}


def test_fewer_conversations_than_templates_use_the_first_templates():
    names = list(TEMPLATES)
    assert sorted(c.template for c in generate_conversations(3, seed=2)) == sorted(names[:3])
    counts = collections.Counter(c.template for c in generate_conversations(13, seed=2))
    assert counts == collections.Counter(names + names[:3])


def test_every_conversation_renders_with_assistant_loss():
    records = [c.record for c in GENERATED]
    loaded = load_conversations(records)
    assert len(loaded.conversations) == len(records) and loaded.num_skipped_lines == 0
    texts = [render_text(conv).text for conv in loaded.conversations]
    tokenizer = with_chat_special_tokens(train_bpe_tokenizer(texts, vocab_size=600, progress=False))
    for conv in loaded.conversations:
        assert conv.messages[-1].role is Role.ASSISTANT
        rendered = render_conversation(conv, tokenizer=tokenizer)
        assert rendered.loss_mask.any() and not rendered.loss_mask.all()


# ---------------------------------------------------------------------------------------------
# The command line


def run_cli(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def test_make_agentic_sft_cli(tmp_path):
    helped = run_cli("--help")
    assert helped.returncode == 0 and "--num-conversations" in helped.stdout and "Examples:" in helped.stdout
    out = tmp_path / "sub" / "agentic.jsonl"
    result = run_cli("--output", str(out), "--num-conversations", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "12 conversations" in result.stdout and "templates: " in result.stdout and "tool calls: " in result.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and [json.loads(line) for line in lines] == [
        c.record for c in generate_conversations(12, seed=3)]
    assert os.listdir(out.parent) == ["agentic.jsonl"]  # no temporary file left
    again = tmp_path / "again.jsonl"
    assert run_cli("--output", str(again), "--num-conversations", "12", "--seed", "3").returncode == 0
    assert again.read_bytes() == out.read_bytes()
    for count in ("0", "-3"):
        failed = run_cli("--output", str(tmp_path / "none.jsonl"), "--num-conversations", count)
        assert failed.returncode == 2 and "argument --num-conversations: must be a positive integer" in failed.stderr


def test_make_agentic_sft_cli_refuses_bad_outputs(tmp_path):
    """A bad --output is an error before generating or while writing; no temporary file is left."""
    (tmp_path / "file").write_text("")
    for output, problem in [(str(tmp_path), "is a directory; name a file in it"), ("", "must name a file"),
                            (str(tmp_path / "file" / "x.jsonl"), "error: cannot write")]:
        result = run_cli("--output", output, "--num-conversations", "1")
        assert result.returncode == 2 and problem in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert os.listdir(tmp_path) == ["file"]


def test_write_jsonl_removes_its_temporary_file_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        write_jsonl(str(target), records=[{"a": 1}])
    assert os.listdir(tmp_path) == ["out.jsonl"] and target.is_dir()
