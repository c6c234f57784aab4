"""The LongCat-Flash chat template, its token-level loss masks, parsing and validation."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat.data.agentic_samples import default_sft_records
from longcat.data.chat import (
    CHAT_SPECIAL_TOKENS,
    END_OF_TURN,
    Conversation,
    Message,
    Role,
    TokenRole,
    add_chat_special_tokens,
    has_chat_special_tokens,
    parse_conversation,
    render_conversation,
    render_text,
    with_chat_special_tokens,
)
from longcat.data.corpus import train_bpe_tokenizer
from longcat.data.tokenizer import load_tokenizer

ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}

# system + tools, a turn with two tool calls (one with JSON-string arguments), two results, a second round.
TOOL_DIALOGUE = {
    "tools": [ADD],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2 and 3+4?"},
        {"role": "assistant", "content": "Adding.", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
            {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 3, \"b\": 4}"}}]},
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "3 and 7."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
}
TOOL_DIALOGUE_TEXT = (
    "SYSTEM:Be brief.\n\n## Tools\nYou can call these functions (one JSON schema per line):\n"
    '{"name": "add", "description": "a + b", "parameters": {"type": "object", "properties": '
    '{"a": {"type": "integer"}, "b": {"type": "integer"}}}} '
    "[Round 0] USER:1+2 and 3+4? ASSISTANT:Adding.\n"
    '<longcat_tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</longcat_tool_call>\n'
    '<longcat_tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</longcat_tool_call></longcat_s>'
    "[Round 1] USER:<longcat_tool_response>3</longcat_tool_response>\n"
    "<longcat_tool_response>7</longcat_tool_response> ASSISTANT:3 and 7.</longcat_s>"
    "[Round 2] USER:Thanks! ASSISTANT:You're welcome.</longcat_s>"
)
SHAREGPT = {
    "tools": json.dumps([ADD["function"]]),
    "system": "Be brief.",
    "conversations": [
        {"from": "human", "value": "1+2?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})},
        {"from": "observation", "value": "3"},
        {"from": "gpt", "value": "3."},
        {"from": "human", "value": "ok"},
        {"from": "gpt", "value": "Bye."},
    ],
}
SHAREGPT_AS_MESSAGES = {
    "tools": [ADD],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "3."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Bye."},
    ],
}
PLAIN = {"messages": [{"role": "user", "content": "héllo 日本"}, {"role": "assistant", "content": "(hi) ü"},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}
ALL_RECORDS = [TOOL_DIALOGUE, SHAREGPT, PLAIN] + default_sft_records()


@pytest.fixture(scope="module")
def plain_tokenizer():
    texts = [render_text(parse_conversation(r)).text for r in ALL_RECORDS]
    return train_bpe_tokenizer(texts, vocab_size=600, progress=False, chat_tokens=False)


@pytest.fixture(scope="module")
def chat_tokenizer(plain_tokenizer):
    return with_chat_special_tokens(plain_tokenizer)


def spans_text(record, role):
    rendered = render_text(parse_conversation(record))
    return "".join(rendered.text[s:e] for s, e, r in rendered.spans if r == role)


def test_exact_template():
    assert render_text(parse_conversation(TOOL_DIALOGUE)).text == TOOL_DIALOGUE_TEXT
    assert render_text(parse_conversation(PLAIN)).text == (
        "[Round 0] USER:héllo 日本 ASSISTANT:(hi) ü</longcat_s>[Round 1] USER:again ASSISTANT:ok</longcat_s>")
    tools_only = {"tools": [ADD], "messages": PLAIN["messages"][:2]}
    assert render_text(parse_conversation(tools_only)).text.startswith(
        "SYSTEM:## Tools\nYou can call these functions (one JSON schema per line):\n{\"name\": \"add\"")


def test_generation_prompt_is_a_prefix_of_the_training_text():
    conv = parse_conversation(TOOL_DIALOGUE)
    for cut in (2, 5, 7):  # after a user turn, after tool results, after the second user turn
        prompt = Conversation(conv.messages[:cut], conv.tools)
        text = render_text(prompt, for_generation=True).text
        assert text.endswith(" ASSISTANT:") and TOOL_DIALOGUE_TEXT.startswith(text)
    with pytest.raises(ValueError, match="generation prompt must end with a user or tool turn"):
        render_text(conv, for_generation=True)


def test_sharegpt_normalises_to_messages():
    sharegpt, messages = parse_conversation(SHAREGPT), parse_conversation(SHAREGPT_AS_MESSAGES)
    assert (sharegpt.messages, sharegpt.tools) == (messages.messages, messages.tools)
    parallel = dict(SHAREGPT, conversations=SHAREGPT["conversations"][:1] + [
        {"from": "function_call", "value": json.dumps([{"name": "add", "arguments": {"a": 1, "b": 2}}] * 2)},
        {"from": "observation", "value": "3"}, {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3"}])
    assert len(parse_conversation(parallel).messages[2].tool_calls) == 2


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_ids_equal_one_full_encode(which, plain_tokenizer, chat_tokenizer):
    tokenizer = plain_tokenizer if which == "plain" else chat_tokenizer
    for record in ALL_RECORDS:
        rendered = render_conversation(record, tokenizer=tokenizer)
        full_text = render_text(parse_conversation(record)).text
        assert rendered.text == full_text
        assert rendered.input_ids.tolist() == tokenizer.encode(full_text)
        assert rendered.input_ids.dtype == np.int64 and rendered.loss_mask.dtype == bool
        assert len(rendered.input_ids) == len(rendered.loss_mask) == len(rendered.roles)


def test_markers_are_single_special_tokens(plain_tokenizer, chat_tokenizer):
    assert has_chat_special_tokens(chat_tokenizer) and not has_chat_special_tokens(plain_tokenizer)
    rendered = render_conversation(TOOL_DIALOGUE, tokenizer=chat_tokenizer)
    end_id = chat_tokenizer.encode(END_OF_TURN)[0]
    ends = rendered.input_ids == end_id
    assert ends.sum() == 3 and rendered.loss_mask[ends].all()


@pytest.mark.parametrize("record", [TOOL_DIALOGUE, SHAREGPT, PLAIN], ids=["tools", "sharegpt", "plain"])
def test_masks_decode_per_role(record, chat_tokenizer):
    """With the markers as special tokens every role boundary is a token boundary."""
    rendered = render_conversation(record, tokenizer=chat_tokenizer)
    for role in TokenRole:
        decoded = chat_tokenizer.decode(rendered.input_ids[rendered.roles == role].tolist())
        assert decoded == spans_text(record, role), role
    assert (rendered.loss_mask == (rendered.roles == TokenRole.ASSISTANT)).all()
    if record is TOOL_DIALOGUE:
        answers = chat_tokenizer.decode(rendered.input_ids[rendered.loss_mask].tolist())
        assert answers == (
            'Adding.\n<longcat_tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</longcat_tool_call>\n'
            '<longcat_tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</longcat_tool_call></longcat_s>'
            "3 and 7.</longcat_s>You're welcome.</longcat_s>")
        tool_results = chat_tokenizer.decode(rendered.input_ids[rendered.roles == TokenRole.TOOL].tolist())
        assert tool_results == ("[Round 1] USER:<longcat_tool_response>3</longcat_tool_response>\n"
                                "<longcat_tool_response>7</longcat_tool_response> ASSISTANT:")
        assert "## Tools" in chat_tokenizer.decode(rendered.input_ids[rendered.roles == TokenRole.TOOLS].tolist())


def check_offsets_invariant(record, rendered, tokenizer):
    """Loss tokens are exactly those touching assistant characters, and they cover all of them."""
    text, spans = render_text(parse_conversation(record))
    char_roles = np.zeros(len(text), dtype=np.int8)
    for s, e, r in spans:
        char_roles[s:e] = r
    is_assistant = char_roles == TokenRole.ASSISTANT
    offsets = tokenizer._tokenizer.encode(text, add_special_tokens=False).offsets
    covered = np.zeros(len(text), dtype=bool)
    for (s, e), loss, role in zip(offsets, rendered.loss_mask, rendered.roles):
        assert loss == is_assistant[s:e].any(), text[s:e]
        assert role == (TokenRole.ASSISTANT if loss else char_roles[s])
        covered[s:e] |= loss
    assert covered[is_assistant].all()


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_loss_covers_exactly_the_assistant_characters(which, plain_tokenizer, chat_tokenizer):
    """Without the markers BPE may merge across a boundary: loss tokens are those touching assistant text."""
    tokenizer = plain_tokenizer if which == "plain" else chat_tokenizer
    for record in ALL_RECORDS:
        check_offsets_invariant(record, render_conversation(record, tokenizer=tokenizer), tokenizer)


def test_add_chat_special_tokens_file(tmp_path, plain_tokenizer):
    src, out = str(tmp_path / "tok.json"), str(tmp_path / "chat.json")
    plain_tokenizer.save(src)
    tok = add_chat_special_tokens(src, out)
    assert tok.vocab_size == plain_tokenizer.vocab_size + len(CHAT_SPECIAL_TOKENS)
    reloaded = load_tokenizer(out)
    assert has_chat_special_tokens(reloaded) and reloaded.vocab_size == tok.vocab_size
    assert reloaded.encode("def f(x): return x") == plain_tokenizer.encode("def f(x): return x")
    assert add_chat_special_tokens(out, str(tmp_path / "again.json")).vocab_size == tok.vocab_size  # idempotent


def messages(*roles, calls=0):
    out = []
    for role in roles:
        message = {"role": role, "content": "x"}
        if role == "assistant" and calls:
            message["tool_calls"] = [{"function": {"name": "f", "arguments": {}}}] * calls
        out.append(message)
    return {"messages": out}


@pytest.mark.parametrize("record,problem", [
    (messages("user", "tool", "assistant"), "message 1 \\(tool\\): tool result without a preceding"),
    (dict(messages("user", "assistant", "tool", "assistant")), "tool result without a preceding"),
    (messages("user", "assistant", "tool", "tool", "assistant", calls=1), "message 3 .*tool result without"),
    (messages("user", "user", "assistant"), "two user turns in a row"),
    (messages("assistant", "user", "assistant"), "assistant turn before any user turn"),
    (messages("system", "assistant"), "assistant turn before any user turn"),
    (messages("user", "assistant", "assistant"), "two assistant turns in a row"),
    (messages("user", "assistant", "user", "assistant", calls=1), "tool call\\(s\\) got no tool result"),
    (messages("user", "system", "assistant"), "only the first message may be a system message"),
    (messages("user"), "must end with an assistant turn"),
    ({"messages": []}, "has no messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "unknown role"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown 'from' 'alien'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content is a int, not a string"),
    ({"text": "x"}, "needs exactly one of 'messages' or 'conversations'"),
    ([1, 2], "expected a JSON object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "arguments is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}]}, "arguments must be a JSON object, got list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{\"x\": NaN}"}}]}]}, "not valid JSON"),
    ({"tools": [ADD], **messages("user", "assistant", calls=1)}, "undeclared tool 'f'"),
    ({"messages": [{"role": "user", "content": "stop</longcat_s>"}, {"role": "assistant", "content": "a"}]},
     "reserved marker '</longcat_s>'"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]},
     "not valid Unicode"),
    ({"tools": "{bad", "messages": []}, "tools is not valid JSON"),
])
def test_invalid_conversations(record, problem):
    with pytest.raises(ValueError, match=f"^where:1: .*{problem}"):
        parse_conversation(record, source="where:1")


def test_hand_built_conversation_is_validated(chat_tokenizer):
    good = Conversation((Message(Role.USER, "q"), Message(Role.ASSISTANT, "a")))
    assert render_conversation(good, tokenizer=chat_tokenizer).loss_mask.any()
    with pytest.raises(ValueError, match="conversation: message 0 .*assistant turn before any user"):
        render_text(Conversation((Message(Role.ASSISTANT, "a"),)))


JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "tool_calls", "function", "name", "arguments", "type", "from", "value",
                     "messages", "conversations", "tools", "system"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=20)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "robot"])
CALL = st.fixed_dictionaries({"function": st.fixed_dictionaries({
    "name": st.sampled_from(["add", "f", ""]), "arguments": JSON | st.text(max_size=12)})})
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": st.text(max_size=10) | JSON},
                                optional={"tool_calls": st.lists(CALL, max_size=2) | JSON})
RECORD = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=6)},
                               optional={"tools": st.just([ADD]) | JSON, "system": JSON}) | JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=RECORD)
def test_fuzz_parse_and_render_raise_only_value_error(record, chat_tokenizer):
    try:
        conv = parse_conversation(record)
        rendered = render_conversation(conv, tokenizer=chat_tokenizer)
    except ValueError:
        return
    assert rendered.input_ids.tolist() == chat_tokenizer.encode(rendered.text)
    assert rendered.loss_mask.any()


TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "</longcat_s>", "{\"a\": 1}", "[Round 1] USER:", "\n"])


@st.composite
def structured_records(draw):
    """Mostly well-ordered conversations with arbitrary texts, so rendering is reached."""
    out = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        out.append({"role": "user", "content": draw(TEXT)})
        num_calls = draw(st.integers(0, 2))
        arguments = st.dictionaries(st.text(max_size=4), JSON_LEAF, max_size=2)
        calls = [{"type": "function", "function": {"name": "add", "arguments": draw(
            arguments | arguments.map(json.dumps) | st.text(max_size=8))}} for _ in range(num_calls)]
        out.append({"role": "assistant", "content": draw(TEXT), "tool_calls": calls})
        if num_calls:
            out += [{"role": "tool", "content": draw(TEXT)} for _ in range(draw(st.integers(1, num_calls)))]
            out.append({"role": "assistant", "content": draw(TEXT)})
    if draw(st.integers(0, 9)) == 0:  # occasionally break the order
        k = draw(st.integers(0, len(out) - 1))
        out[k] = dict(out[k], role=draw(ROLE))
    return {"tools": [ADD] if draw(st.booleans()) else [], "messages": out}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=structured_records())
def test_fuzz_structured_render_matches_one_encode(record, chat_tokenizer):
    try:
        rendered = render_conversation(record, tokenizer=chat_tokenizer)
    except ValueError:
        return
    assert rendered.input_ids.tolist() == chat_tokenizer.encode(rendered.text)
    check_offsets_invariant(record, rendered, chat_tokenizer)
