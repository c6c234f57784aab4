r"""The LongCat-Flash chat format: conversations with tool use -> token ids and a per-token loss mask.

Source: the LongCat-Flash report (arXiv 2509.01322, data pipeline; the released model's format). The
exact template, with ``{...}`` the message texts and ``N`` the round index (0, 1, ...; one round per
user or tool-result slot)::

    SYSTEM:{system}{tools_block} [Round 0] USER:{user} ASSISTANT:{assistant}</longcat_s>[Round 1] USER:...

- The system section ``SYSTEM:{system}{tools_block}`` and the space after it are present when the
  conversation has a system message or tools, else omitted: the text then starts ``[Round 0] USER:``.
- ``tools_block`` (only with tools; ``\n\n`` before it only when the system text is non-empty)::

      \n\n## Tools\nYou can call these functions (one JSON schema per line):\n{tool_0}\n{tool_1}

  where ``{tool_i}`` is ``json.dumps(spec, ensure_ascii=False)`` of the function object (the
  ``"function"`` value of an OpenAI-style ``{"type": "function", "function": {...}}`` entry).
- A user turn: ``[Round N] USER:{content} ASSISTANT:``.
- An assistant turn: its content and each tool call, joined by ``\n`` (empty content omitted), then
  ``</longcat_s>``. A tool call is
  ``<longcat_tool_call>{"name": NAME, "arguments": {...}}</longcat_tool_call>`` (``json.dumps`` with
  ``ensure_ascii=False``, argument keys in their given order).
- The tool results answering an assistant's calls fill the next round's user slot, each wrapped and
  joined by ``\n``: ``[Round N] USER:<longcat_tool_response>{result}</longcat_tool_response> ASSISTANT:``.

Example, the concatenation of these Python literals (pinned by TOOL_DIALOGUE_TEXT in
tests/unit/data/test_chat_render.py; the tool schema is shortened here)::

    "SYSTEM:Be brief.\n\n## Tools\nYou can call these functions (one JSON schema per line):\n"
    '{"name": "add", "description": "a + b", "parameters": {...}} '
    "[Round 0] USER:1+2 and 3+4? ASSISTANT:Adding.\n"
    '<longcat_tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</longcat_tool_call>\n'
    '<longcat_tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</longcat_tool_call></longcat_s>'
    "[Round 1] USER:<longcat_tool_response>3</longcat_tool_response>\n"
    "<longcat_tool_response>7</longcat_tool_response> ASSISTANT:3 and 7.</longcat_s>"
    "[Round 2] USER:Thanks! ASSISTANT:You're welcome.</longcat_s>"

Loss: only the assistant spans (content, tool calls and their ``</longcat_s>``) are trained; the
system text, tools block, user turns (including the ``[Round N] USER:`` and `` ASSISTANT:``
scaffolding; the space after the system section belongs to round 0) and tool results are masked.
``render_conversation`` tokenizes the whole text in ONE call, exactly as inference encodes it, and
derives the masks from the tokens' character offsets: a token is a loss token iff it covers at least
one assistant character (so every assistant character is trained; where BPE merges across a
boundary, e.g. ``>[`` without the special tokens or ``:(`` before an answer opening with
punctuation, the merged token counts as assistant). ``add_chat_special_tokens`` makes the five
markers single special tokens, which keeps every boundary at a marker exact.

Conversations are validated (``validate_conversation``): an optional leading system message, then
user -> assistant rounds; an assistant with k tool calls is followed by 1..k tool results and then an
assistant turn; a training conversation ends with an assistant turn. Message texts may not contain
the markers or ``<|endoftext|>``/``<|pad|>`` (they would tokenize as control tokens).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer

from longcat.data.tokenizer import EOD_TOKEN, PAD_TOKEN, TextTokenizer, load_tokenizer

END_OF_TURN = "</longcat_s>"
TOOL_CALL_START, TOOL_CALL_END = "<longcat_tool_call>", "</longcat_tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<longcat_tool_response>", "</longcat_tool_response>"
CHAT_SPECIAL_TOKENS = (END_OF_TURN, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END)
RESERVED_STRINGS = CHAT_SPECIAL_TOKENS + (EOD_TOKEN, PAD_TOKEN)
TOOLS_HEADER = "## Tools\nYou can call these functions (one JSON schema per line):\n"


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class TokenRole(enum.IntEnum):
    """What a rendered character or token belongs to; only ASSISTANT carries loss."""

    SYSTEM = 0
    TOOLS = 1  # the ## Tools block
    USER = 2  # a user turn, with its [Round N] USER: ... ASSISTANT: scaffolding
    ASSISTANT = 3
    TOOL = 4  # a round whose user slot holds tool results


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict  # a JSON object

    def render(self) -> str:
        """``<longcat_tool_call>{"name": ..., "arguments": {...}}</longcat_tool_call>``."""
        body = _dumps({"name": self.name, "arguments": self.arguments}, f"tool call {self.name!r}")
        return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


@dataclasses.dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One normalized conversation. ``tools``: function specs (name, description, parameters, ...)."""

    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = ()
    source: str = "conversation"  # FILE:LINE or "record i", named in errors


class RenderedText(NamedTuple):
    text: str
    spans: list[tuple[int, int, TokenRole]]  # [start, end) character ranges partitioning text


class RenderedConversation(NamedTuple):
    """A tokenized conversation. Legend: T = number of tokens.

    input_ids: [T] int64, identical to ``tokenizer.encode(text)``.
    loss_mask: [T] bool, True on assistant tokens (answers, tool calls, ``</longcat_s>``).
    roles: [T] int8 ``TokenRole`` of each token.
    text: the rendered text.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    roles: np.ndarray
    text: str


# ---------------------------------------------------------------------------------------------
# Parsing: `messages` and ShareGPT `conversations` records -> Conversation

_SHAREGPT_ROLES = {
    "system": Role.SYSTEM, "human": Role.USER, "user": Role.USER, "gpt": Role.ASSISTANT,
    "assistant": Role.ASSISTANT, "function_call": Role.ASSISTANT, "observation": Role.TOOL, "tool": Role.TOOL,
}


def parse_conversation(record: Any, *, source: str = "record", for_generation: bool | None = False) -> Conversation:
    """Normalize one JSON record to a validated ``Conversation``.

    Accepted forms: ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?: [...]}`` and
    ShareGPT ``{"conversations": [{"from", "value"}], "tools"?, "system"?}`` (``from`` in system,
    human, gpt, function_call (value: a call or list of calls as JSON), observation). ``tools`` may be
    a list or its JSON string; tool-call ``arguments`` an object or its JSON string.
    ``for_generation`` is passed to ``validate_conversation`` (default: a training conversation).

    Raises:
        ValueError: ``SOURCE: problem`` for a malformed record, invalid JSON arguments, unknown roles
            or roles out of order (see ``validate_conversation``).
    """
    try:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if ("messages" in record) == ("conversations" in record):
            fields = sorted(map(str, record))[:8]
            raise ValueError(f"needs exactly one of 'messages' or 'conversations' (fields: {fields})")
        if "messages" in record:
            items = _list(record["messages"], "messages")
            messages = [_parse_message(m, f"messages[{k}]") for k, m in enumerate(items)]
        else:
            items = _list(record["conversations"], "conversations")
            messages = [_parse_sharegpt_turn(m, f"conversations[{k}]") for k, m in enumerate(items)]
        system = record.get("system")
        if system is not None and system != "":
            if messages and messages[0].role is Role.SYSTEM:
                raise ValueError("has both a top-level 'system' and a system message; keep one")
            messages.insert(0, Message(Role.SYSTEM, _text(system, "system")))
        conv = Conversation(tuple(messages), _parse_tools(record.get("tools")), source)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    validate_conversation(conv, for_generation=for_generation)
    return conv


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} is a {type(value).__name__}, not a list")
    return value


def _text(value: Any, where: str) -> str:
    """A message text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(_text(p.get("text"), f"{where} text part") for p in value)
    raise ValueError(f"{where} is a {type(value).__name__}, not a string (or a list of text parts)")


def _load_json(text: str, where: str) -> Any:
    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where} is not valid JSON ({e})") from None


def _dumps(obj: Any, where: str) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{where} cannot be written as JSON ({e})") from None


def _parse_message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is a {type(item).__name__}, not an object")
    role_name = item.get("role")
    if not isinstance(role_name, str) or role_name not in {r.value for r in Role}:
        raise ValueError(f"{where} has unknown role {role_name!r}; expected system, user, assistant or tool")
    role = Role(role_name)
    calls = item.get("tool_calls") or []
    if calls and role is not Role.ASSISTANT:
        raise ValueError(f"{where}: only assistant messages may carry tool_calls, not {role.value}")
    calls = _list(calls, f"{where}.tool_calls")
    tool_calls = tuple(_parse_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
    content = item.get("content")
    if content is None and role is Role.ASSISTANT:
        content = ""
    elif role is Role.TOOL and isinstance(content, (dict, list)) and not _is_text_parts(content):
        content = _dumps(content, f"{where}.content")
    return Message(role, _text(content, f"{where}.content"), tool_calls)


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value)


def _parse_tool_call(item: Any, where: str) -> ToolCall:
    if isinstance(item, dict) and "function" in item:
        if item.get("type", "function") != "function":
            raise ValueError(f"{where} has type {item.get('type')!r}; only 'function' calls are supported")
        item = item["function"]
    if not isinstance(item, dict):
        raise ValueError(f"{where} is a {type(item).__name__}, not an object with 'name' and 'arguments'")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no function name (got {name!r})")
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _load_json(arguments, f"{where}.arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.arguments must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments)


def _parse_sharegpt_turn(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is a {type(item).__name__}, not an object")
    sender = item.get("from")
    if not isinstance(sender, str) or sender not in _SHAREGPT_ROLES:
        raise ValueError(f"{where} has unknown 'from' {sender!r}; expected one of {sorted(_SHAREGPT_ROLES)}")
    value = item.get("value")
    if sender == "function_call":
        calls = _load_json(value, f"{where}.value") if isinstance(value, str) else value
        calls = calls if isinstance(calls, list) else [calls]
        return Message(Role.ASSISTANT, "", tuple(_parse_tool_call(c, f"{where}.value") for c in calls))
    return _parse_message({"role": _SHAREGPT_ROLES[sender].value, "content": value}, where)


def _parse_tools(tools: Any) -> tuple[dict, ...]:
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        tools = _load_json(tools, "tools")
    specs = []
    for k, tool in enumerate(_list(tools, "tools")):
        if isinstance(tool, dict) and "function" in tool and tool.get("type", "function") == "function":
            tool = tool["function"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ValueError(f"tools[{k}] is not a function spec with a 'name' (got {str(tool)[:80]!r})")
        specs.append(tool)
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# Validation


def validate_conversation(conv: Conversation, *, for_generation: bool | None = False) -> None:
    """Check role order, tool-call bookkeeping and texts of ``conv``.

    Args:
        for_generation: False: must end with an assistant turn (training); True: must end with a
            user or tool turn (an inference prompt); None: either.

    Raises:
        ValueError: ``SOURCE: message K (role): problem`` for roles out of order (a tool result without
            a preceding tool call, two user turns in a row, an assistant before any user, ...), a call to
            an undeclared tool, or a text holding a reserved marker or an unpaired surrogate.
    """
    try:
        _check_order(conv.messages, for_generation)
        _check_texts(conv)
    except ValueError as e:
        raise ValueError(f"{conv.source}: {e}") from None


def _check_order(messages: Sequence[Message], for_generation: bool | None) -> None:
    if not messages:
        raise ValueError("has no messages")
    pending = 0  # tool calls of the last assistant turn not yet answered by a tool result
    previous: Role | None = None
    for k, message in enumerate(messages):
        if not isinstance(message, Message) or not isinstance(message.role, Role):
            raise ValueError(f"message {k} is not a Message with a Role")
        role, at = message.role, f"message {k} ({message.role.value})"
        if role is Role.SYSTEM and k != 0:
            raise ValueError(f"{at}: only the first message may be a system message")
        if role is Role.USER and previous is Role.USER:
            raise ValueError(f"{at}: two user turns in a row; merge them or add the assistant reply between")
        if role is Role.USER and previous is Role.TOOL:
            raise ValueError(f"{at}: a user turn right after tool results; the assistant must answer them first")
        if role is Role.USER and pending:
            raise ValueError(f"{at}: the previous assistant's {pending} tool call(s) got no tool result")
        if role is Role.ASSISTANT and previous in (None, Role.SYSTEM):
            raise ValueError(f"{at}: assistant turn before any user turn")
        if role is Role.ASSISTANT and previous is Role.ASSISTANT:
            problem = "its tool call(s) got no tool result" if pending else "two assistant turns in a row"
            raise ValueError(f"{at}: {problem}")
        if role is Role.TOOL:
            if not pending:
                raise ValueError(f"{at}: tool result without a preceding (unanswered) tool call")
            pending -= 1
        if role is Role.ASSISTANT:
            pending = len(message.tool_calls)
        previous = role
    assert previous is not None  # messages is non-empty
    if for_generation is False and previous is not Role.ASSISTANT:
        raise ValueError(f"ends with a {previous.value} turn; a training conversation must end with an assistant turn")
    if for_generation is True and previous not in (Role.USER, Role.TOOL):
        raise ValueError(f"ends with a {previous.value} turn; a generation prompt must end with a user or tool turn")


def _check_texts(conv: Conversation) -> None:
    for k, tool in enumerate(conv.tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise ValueError(f"tools[{k}] is not a function spec with a 'name'")
    declared = {tool["name"] for tool in conv.tools}
    texts = [(f"tools[{k}]", _dumps(tool, f"tools[{k}]")) for k, tool in enumerate(conv.tools)]
    for k, message in enumerate(conv.messages):
        texts.append((f"message {k} ({message.role.value}) content", message.content))
        for j, call in enumerate(message.tool_calls):
            if declared and call.name not in declared:
                raise ValueError(f"message {k} calls undeclared tool {call.name!r} (tools: {sorted(declared)})")
            texts.append((f"message {k} tool_calls[{j}]", call.render()[len(TOOL_CALL_START):-len(TOOL_CALL_END)]))
    for where, text in texts:
        if not isinstance(text, str):
            raise ValueError(f"{where} is a {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where} is not valid Unicode ({e.reason} at {e.start})") from None
        for marker in RESERVED_STRINGS:
            if marker in text:
                raise ValueError(f"{where} contains the reserved marker {marker!r}; remove or escape it")


# ---------------------------------------------------------------------------------------------
# Rendering


def render_text(conv: Conversation, *, for_generation: bool = False) -> RenderedText:
    """The conversation in the LongCat-Flash template (module docstring) with each span's role.

    With ``for_generation`` the conversation must end with a user or tool turn and the text ends
    with `` ASSISTANT:``, the prompt inference continues; else it must end with an assistant turn.

    Raises:
        ValueError: as ``validate_conversation``.
    """
    validate_conversation(conv, for_generation=for_generation)
    pieces: list[tuple[str, TokenRole]] = []
    messages = list(conv.messages)
    system = messages.pop(0).content if messages[0].role is Role.SYSTEM else None
    if system is not None or conv.tools:
        pieces.append(("SYSTEM:" + (system or ""), TokenRole.SYSTEM))
        if conv.tools:
            schemas = "\n".join(_dumps(tool, "tool spec") for tool in conv.tools)
            pieces.append((("\n\n" if system else "") + TOOLS_HEADER + schemas, TokenRole.TOOLS))
    # The space after the system section joins round 0, as BPE pre-tokenizers attach it to "[".
    separator = " " if pieces else ""
    round_index, k = 0, 0
    while k < len(messages):
        message = messages[k]
        if message.role is Role.ASSISTANT:
            parts = ([message.content] if message.content else []) + [c.render() for c in message.tool_calls]
            pieces.append(("\n".join(parts) + END_OF_TURN, TokenRole.ASSISTANT))
            k += 1
            continue
        if message.role is Role.USER:
            slot, role = message.content, TokenRole.USER
            k += 1
        else:  # the run of tool results answering the previous assistant's calls
            results = []
            while k < len(messages) and messages[k].role is Role.TOOL:
                results.append(f"{TOOL_RESPONSE_START}{messages[k].content}{TOOL_RESPONSE_END}")
                k += 1
            slot, role = "\n".join(results), TokenRole.TOOL
        pieces.append((f"{separator}[Round {round_index}] USER:{slot} ASSISTANT:", role))
        separator = ""
        round_index += 1
    spans, start = [], 0
    for text, role in pieces:
        if text:
            spans.append((start, start + len(text), role))
            start += len(text)
    return RenderedText("".join(text for text, _ in pieces), spans)


def render_conversation(conv: Conversation | Mapping, *, tokenizer: TextTokenizer) -> RenderedConversation:
    """Tokenize a training conversation once, as inference would, with per-token loss mask and roles.

    Args:
        conv: a ``Conversation`` or a raw record (parsed with ``parse_conversation``); must end with
            an assistant turn.
        tokenizer: the model's tokenizer; with ``add_chat_special_tokens`` applied the markers are
            single tokens.

    Returns:
        RenderedConversation: [T] input_ids (== ``tokenizer.encode(render_text(conv).text)``),
        loss_mask, roles; see the module docstring for which tokens carry loss.

    Raises:
        ValueError: as ``parse_conversation`` / ``validate_conversation``.
    """
    if not isinstance(conv, Conversation):
        conv = parse_conversation(conv)
    text, spans = render_text(conv)
    # TextTokenizer.encode returns ids only; the offsets come from the same single encode call.
    encoding = tokenizer._tokenizer.encode(text, add_special_tokens=False)
    offsets_T2 = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(text))
    char_roles = np.empty(len(text), dtype=np.int8)
    for start, end, role in spans:
        char_roles[start:end] = role
    assistant_before = np.concatenate([[0], np.cumsum(char_roles == TokenRole.ASSISTANT)])  # [len(text) + 1]
    starts, ends = offsets_T2[:, 0], offsets_T2[:, 1]
    first_char = np.minimum(starts, len(text) - 1)
    # An empty offset span (possible with trimmed offsets) takes the role of the character at its start.
    loss_mask = np.where(ends > starts, assistant_before[ends] > assistant_before[starts],
                         char_roles[first_char] == TokenRole.ASSISTANT)
    roles = np.where(loss_mask, np.int8(TokenRole.ASSISTANT), char_roles[first_char]).astype(np.int8)
    return RenderedConversation(np.asarray(encoding.ids, dtype=np.int64), loss_mask, roles, text)


# ---------------------------------------------------------------------------------------------
# Special tokens


def has_chat_special_tokens(tokenizer: TextTokenizer) -> bool:
    """Whether every marker of ``CHAT_SPECIAL_TOKENS`` is a single token of ``tokenizer``."""
    return all(len(tokenizer.encode(t)) == 1 for t in CHAT_SPECIAL_TOKENS)


def with_chat_special_tokens(tokenizer: TextTokenizer) -> TextTokenizer:
    """A copy of ``tokenizer`` with the chat markers added as special tokens (idempotent).

    New markers get the next free ids (vocab_size grows by up to 5; existing ids are unchanged), so
    a model trained with the old tokenizer needs ``model.vocab_size >= tokenizer.vocab_size``.
    """
    inner = Tokenizer.from_str(tokenizer._tokenizer.to_str())
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS])
    return TextTokenizer(inner, path=tokenizer.path)


def add_chat_special_tokens(tokenizer_json_in: str, out: str) -> TextTokenizer:
    """Write ``out``: the tokenizer.json ``tokenizer_json_in`` with the chat markers as special tokens.

    Use it on the stdlib tokenizer (``prepare_stdlib_corpus(...).tokenizer_path``) before SFT.

    Raises:
        ValueError: as ``load_tokenizer`` for a missing or malformed input.
    """
    tokenizer = with_chat_special_tokens(load_tokenizer(tokenizer_json_in))
    tokenizer.save(out)
    tokenizer.path = out
    return tokenizer
