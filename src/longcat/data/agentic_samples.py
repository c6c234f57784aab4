"""A tiny embedded agentic SFT set: 40 synthetic multi-turn tool-use conversations, built by code.

PAPER.md "Data pipeline" lists synthetic multi-turn tool dialogues among the post-training data; this
is a stand-in of that shape small enough to run the SFT recipe offline on CPU. Every conversation is
a deterministic function of its index (no RNG), in the ``messages`` JSONL format read by
``longcat.data.sft``. Templates (tool results are computed, so answers are consistent):

- calculator (12): one call, or a two-step computation with a second user round;
- weather (12): one city, or two cities queried with parallel calls and compared;
- file search (10): ``search_files`` then ``read_file`` to answer a question about a config file;
- no tool needed (6): tools are offered but the answer needs none, over two rounds.
"""

from __future__ import annotations

import json
import os

CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with integers and + - * //.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
GET_WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
SEARCH_FILES = {
    "name": "search_files",
    "description": "List files under a directory whose names match a glob pattern.",
    "parameters": {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "directory": {"type": "string"}},
        "required": ["pattern"],
    },
}
READ_FILE = {
    "name": "read_file",
    "description": "Read a text file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
}
ALL_TOOLS = [CALCULATOR, GET_WEATHER, SEARCH_FILES, READ_FILE]

_CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Reykjavik"]
_CONDITIONS = ["sunny", "cloudy", "light rain", "windy", "foggy", "snowing"]
_SERVICES = ["billing", "search", "auth", "gateway", "metrics", "mailer", "scheduler", "cache", "uploads", "chat"]
_SYSTEM = "You are a helpful assistant. Use the tools when they help."


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tool(result) -> dict:
    return {"role": "tool", "content": result if isinstance(result, str) else json.dumps(result)}


def _weather(city: str, unit: str) -> dict:
    celsius = (sum(map(ord, city)) % 35) - 5
    temperature = celsius if unit == "celsius" else celsius * 9 // 5 + 32
    return {"city": city, "temperature": temperature, "unit": unit,
            "condition": _CONDITIONS[len(city) % len(_CONDITIONS)]}


def _calculator(i: int) -> dict:
    a, b, c = 12 + 7 * i, 3 + i % 9, 2 + i % 5
    if i < 8:
        op, value = [("*", a * b), ("+", a + b), ("-", a - b), ("//", a // b)][i % 4]
        expression = f"{a} {op} {b}"
        messages = [
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("calculator", expression=expression)]},
            _tool(str(value)),
            {"role": "assistant", "content": f"{expression} = {value}."},
        ]
    else:
        total, left = a * b, a * b - c
        messages = [
            {"role": "user", "content": f"I have {b} boxes of {a} pens and give away {c} pens. How many are left?"},
            {"role": "assistant", "content": "First the total number of pens.",
             "tool_calls": [_call("calculator", expression=f"{b} * {a}")]},
            _tool(str(total)),
            {"role": "assistant", "content": None, "tool_calls": [_call("calculator", expression=f"{total} - {c}")]},
            _tool(str(left)),
            {"role": "assistant", "content": f"You have {total} pens, so {left} are left after giving away {c}."},
            {"role": "user", "content": "And with one more box?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("calculator", expression=f"{left} + {a}")]},
            _tool(str(left + a)),
            {"role": "assistant", "content": f"With one more box of {a} you would have {left + a} pens."},
        ]
    return {"tools": [CALCULATOR], "messages": messages}


def _weather_conversation(i: int) -> dict:
    unit = "celsius" if i % 3 else "fahrenheit"
    city = _CITIES[i % len(_CITIES)]
    if i < 8:
        w = _weather(city, unit)
        question = f"What's the weather like in {city}?" + (" In Fahrenheit please." if unit == "fahrenheit" else "")
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", city=city, unit=unit)]},
            _tool(w),
            {"role": "assistant", "content": f"It is {w['condition']} in {city}, {w['temperature']} degrees {unit}."},
        ]
    else:
        other = _CITIES[(i + 3) % len(_CITIES)]
        w1, w2 = _weather(city, unit), _weather(other, unit)
        warmer = city if w1["temperature"] >= w2["temperature"] else other
        messages = [
            {"role": "user", "content": f"Is it warmer in {city} or in {other} right now?"},
            {"role": "assistant", "content": "Let me check both cities.",
             "tool_calls": [_call("get_weather", city=city, unit=unit), _call("get_weather", city=other, unit=unit)]},
            _tool(w1),
            _tool(w2),
            {"role": "assistant", "content": f"{warmer} is warmer: {city} has {w1['temperature']} and {other} has "
             f"{w2['temperature']} degrees {unit}."},
        ]
    return {"tools": [GET_WEATHER], "messages": messages}


def _file_search(i: int) -> dict:
    service = _SERVICES[i % len(_SERVICES)]
    port = 8000 + 37 * i
    path = f"/srv/{service}/config/{service}.yaml"
    messages = [
        {"role": "user", "content": f"Which port does the {service} service listen on?"},
        {"role": "assistant", "content": None,
         "tool_calls": [_call("search_files", pattern=f"{service}*.yaml", directory="/srv")]},
        _tool({"matches": [path, f"/srv/{service}/config/{service}.example.yaml"]}),
        {"role": "assistant", "content": f"I found the config; reading {path}.",
         "tool_calls": [_call("read_file", path=path)]},
        _tool(f"name: {service}\nport: {port}\nworkers: {2 + i % 4}\n"),
        {"role": "assistant", "content": f"The {service} service listens on port {port} (set in {path})."},
    ]
    return {"tools": [SEARCH_FILES, READ_FILE], "messages": messages}


def _no_tool(i: int) -> dict:
    n = 3 + i
    messages = [
        {"role": "user", "content": "Hi! What can you help me with?"},
        {"role": "assistant", "content": "I can do arithmetic, look up the weather and search and read files."},
        {"role": "user", "content": f"Thanks. How many sides does a polygon with {n} corners have?"},
        {"role": "assistant", "content": f"A polygon with {n} corners has {n} sides."},
    ]
    return {"tools": ALL_TOOLS, "messages": messages}


def default_sft_records() -> list[dict]:
    """The 40 conversations as ``messages`` records; every fourth opens with a system message."""
    records = ([_calculator(i) for i in range(12)] + [_weather_conversation(i) for i in range(12)]
               + [_file_search(i) for i in range(10)] + [_no_tool(i) for i in range(6)])
    for k, record in enumerate(records):
        if k % 4 == 0:
            record["messages"].insert(0, {"role": "system", "content": _SYSTEM})
    return records


def write_default_sft_jsonl(path: str) -> int:
    """Write ``default_sft_records()`` to ``path`` (one JSON object per line, atomically); return the count."""
    records = default_sft_records()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(records)
