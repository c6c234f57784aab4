"""SFT samples from chat JSONL: labels, padding, overflow, packing, split, the JSONL reader and the tool."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat.data.agentic_samples import (
    DEFAULT_NUM_CONVERSATIONS,
    default_sft_records,
    write_default_sft_jsonl,
)
from longcat.data.chat import (
    parse_conversation,
    render_conversation,
    render_text,
    with_chat_special_tokens,
)
from longcat.data.corpus import train_bpe_tokenizer
from longcat.data.sampler import MicroBatchLoader
from longcat.data.samples import IGNORE_INDEX, Split
from longcat.data.sft import Overflow, Packing, SFTDataset, read_conversations

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(REPO, "tools", "prepare_sft.py")
RECORDS = default_sft_records()
N = DEFAULT_NUM_CONVERSATIONS  # 70


@pytest.fixture(scope="module")
def tokenizer():
    texts = [render_text(parse_conversation(r)).text for r in RECORDS]
    # vocab 800: every conversation fits 512 tokens (the longest is ~480)
    return with_chat_special_tokens(train_bpe_tokenizer(texts, vocab_size=800, progress=False))


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sft") / "agentic.jsonl")
    assert write_default_sft_jsonl(path) == N
    return path


def dataset(source, tokenizer, **overrides):
    kwargs = dict(tokenizer=tokenizer, seq_length=512, seed=3, split=Split.TRAIN, valid_fraction=0.1)
    return SFTDataset(source, **{**kwargs, **overrides})


def test_default_set_is_deterministic_and_agentic(tmp_path, sft_jsonl):
    other = str(tmp_path / "again.jsonl")
    write_default_sft_jsonl(other)
    assert open(other).read() == open(sft_jsonl).read()
    convs = read_conversations(sft_jsonl).conversations
    assert len(convs) == N
    calls = [len(m.tool_calls) for c in convs for m in c.messages]
    assert max(calls) == 3 and sum(calls) > N
    assert all(sum(m.role.value == "assistant" for m in c.messages) >= 2 for c in convs)  # multi-turn
    assert sum(sum(len(m.tool_calls) for m in c.messages) >= 2 for c in convs) == 42  # multi-step or parallel


def test_samples_follow_the_render(sft_jsonl, tokenizer):
    ds = dataset(sft_jsonl, tokenizer, valid_fraction=0.25)
    convs = read_conversations(sft_jsonl).conversations
    rendered = {tuple(r.input_ids.tolist()): r for r in (render_conversation(c, tokenizer=tokenizer) for c in convs)}
    assert ds.stats.num_conversations == len(ds) == 52 and ds.stats.num_dropped == 0
    for k in range(len(ds)):
        sample = ds.sample(k)
        assert {key: (v.dtype, tuple(v.shape)) for key, v in sample.items()} == {
            "input_ids": (torch.int64, (512,)), "labels": (torch.int64, (512,)), "token_mask": (torch.bool, (512,))}
        n = int(sample["token_mask"].sum())
        assert sample["token_mask"][:n].all() and not sample["token_mask"][n:].any()  # padded on the right
        ids = sample["input_ids"].numpy()
        assert (ids[n:] == tokenizer.pad_id).all()
        r = rendered[tuple(ids[:n].tolist())]
        expected = np.where(r.loss_mask[1:], r.input_ids[1:], IGNORE_INDEX)
        labels = sample["labels"].numpy()
        assert (labels[: n - 1] == expected).all() and (labels[n - 1:] == IGNORE_INDEX).all()
        answer = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
        assert answer.endswith("</longcat_s>") and answer.count("</longcat_s>") == r.text.count("</longcat_s>")
        assert "<longcat_tool_response>" not in answer and "USER:" not in answer


def test_split_is_seeded_disjoint_and_complete(sft_jsonl, tokenizer):
    def texts(ds):
        return {tuple(ds.sample(k)["input_ids"].tolist()) for k in range(len(ds))}
    train, valid = dataset(sft_jsonl, tokenizer), dataset(sft_jsonl, tokenizer, split=Split.VALID)
    assert (len(train), len(valid)) == (63, 7)
    assert not texts(train) & texts(valid) and len(texts(train) | texts(valid)) == N
    # The split does not depend on seq_length (every conversation fits 512 tokens).
    assert {t[:400] for t in texts(dataset(sft_jsonl, tokenizer, seq_length=600))} == {t[:400] for t in texts(train)}
    assert texts(dataset(sft_jsonl, tokenizer, seed=4)) != texts(train)


def test_epoch_cycling_and_micro_batch_loader(sft_jsonl, tokenizer):
    ds = dataset(sft_jsonl, tokenizer)
    epoch0 = [tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
    assert sorted(epoch0) == sorted(tuple(ds.sample(k)["input_ids"].tolist()) for k in range(len(ds)))
    assert [tuple(ds[len(ds) + i]["input_ids"].tolist()) for i in range(len(ds))] != epoch0
    loaders = [MicroBatchLoader(ds, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    batches = [next(loader) for loader in loaders]
    assert all(b["input_ids"].shape == b["labels"].shape == b["token_mask"].shape == (2, 512) for b in batches)
    assert (batches[1]["input_ids"][0] == ds[2]["input_ids"]).all()


def test_overflow_drop_and_truncate(sft_jsonl, tokenizer):
    lengths = sorted(len(render_conversation(c, tokenizer=tokenizer).input_ids)
                     for c in read_conversations(sft_jsonl).conversations)
    seq_length = lengths[len(lengths) // 2]
    while {seq_length, seq_length + 1} & set(lengths):  # S or S + 1 tokens would fill a sample untruncated
        seq_length -= 1
    dropped = dataset(sft_jsonl, tokenizer, seq_length=seq_length, valid_fraction=0.5)
    assert dropped.stats.num_dropped > 0 and dropped.stats.num_truncated == 0
    assert len(dropped) == dropped.stats.num_conversations - dropped.stats.num_dropped
    assert all(dropped.sample(k)["token_mask"].sum() < seq_length + 1 for k in range(len(dropped)))
    truncated = dataset(sft_jsonl, tokenizer, seq_length=seq_length, valid_fraction=0.5, overflow=Overflow.TRUNCATE)
    assert truncated.stats.num_truncated == dropped.stats.num_dropped and len(truncated) == N // 2
    assert sum(bool(truncated.sample(k)["token_mask"].all()) for k in range(N // 2)) == truncated.stats.num_truncated
    with pytest.raises(ValueError, match="no conversation that fits seq_length \\+ 1 = 11 tokens .*raise "
                       "data.seq_length or set data.sft_overflow=truncate"):
        dataset(sft_jsonl, tokenizer, seq_length=10)
    with pytest.raises(ValueError, match="raise data.seq_length: with data.sft_overflow=truncate a conversation is "
                                         "still dropped") as error:
        dataset(sft_jsonl, tokenizer, seq_length=10, overflow=Overflow.TRUNCATE)
    assert "set data.sft_overflow=truncate" not in str(error.value)  # it is set already


def test_packing_keeps_every_loss_token(sft_jsonl, tokenizer):
    padded = dataset(sft_jsonl, tokenizer)
    packed = dataset(sft_jsonl, tokenizer, packing=Packing.GREEDY, seq_length=1024)
    assert len(packed) < len(padded) / 2
    assert packed.stats.num_loss_tokens == padded.stats.num_loss_tokens
    eod_count = 0
    for k in range(len(packed)):
        sample = packed.sample(k)
        ids, labels = sample["input_ids"], sample["labels"]
        eod = ids == tokenizer.eod_id
        eod_count += int(eod.sum())
        assert (labels[eod] == IGNORE_INDEX).all()  # nothing is learned across a conversation boundary
        assert not (labels == tokenizer.eod_id).any()
    assert eod_count >= len(padded) - len(packed)


def test_records_input_and_bad_input(tmp_path, tokenizer):
    records = RECORDS[:10] + [{"messages": [{"role": "tool", "content": "x"}]}]
    with pytest.raises(ValueError, match="record 10: message 0 \\(tool\\): tool result without"):
        dataset(records, tokenizer)
    assert dataset(records, tokenizer, skip_bad_lines=True).stats.num_skipped_lines == 1
    with pytest.raises(ValueError, match="seq_length=0 must be >= 1"):
        dataset(records, tokenizer, seq_length=0)
    with pytest.raises(ValueError, match="does not exist"):
        dataset(str(tmp_path / "missing.jsonl"), tokenizer)


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return str(path)


def test_reader_names_file_and_line(tmp_path):
    good = json.dumps(RECORDS[0])
    bad_args = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": "{oops"}}]}]})
    lines = [good, "", "{broken", b"\xff\xfe", json.dumps({"conversations": [{"from": "gpt", "value": "a"}]}), bad_args,
             "[" * 100000, good]
    path = write_lines(tmp_path / "chats.jsonl", lines)
    for line_number, problem in [(3, "malformed JSON"), (4, "not valid UTF-8"), (5, "assistant turn before any user"),
                                 (6, "arguments is not valid JSON"), (7, "malformed JSON")]:
        only = write_lines(tmp_path / f"l{line_number}.jsonl", [good] * (line_number - 1) + [lines[line_number - 1]])
        with pytest.raises(ValueError, match=rf"l{line_number}\.jsonl:{line_number}: .*{problem}.*--skip-bad-lines"):
            read_conversations(only)
    loaded = read_conversations(path, skip_bad_lines=True)
    assert (len(loaded.conversations), loaded.num_skipped_lines) == (2, 5)
    assert loaded.conversations[1].source.endswith("chats.jsonl:8")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=40) | st.text(max_size=40).map(str.encode)
                      | st.sampled_from([json.dumps(r).encode() for r in RECORDS[:3]]), max_size=5))
def test_fuzz_reader_raises_only_value_error(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        read_conversations(path)
    except ValueError:
        pass
    loaded = read_conversations(path, skip_bad_lines=True)
    num_lines = sum(bool(line.strip()) for line in path.read_bytes().split(b"\n"))
    assert len(loaded.conversations) + loaded.num_skipped_lines == num_lines


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60)


def test_prepare_sft_tool(tmp_path, sft_jsonl, tokenizer):
    assert run_tool("--help").returncode == 0 and "--skip-bad-lines" in run_tool("--help").stdout
    tok_path = str(tmp_path / "tok.json")
    tokenizer.save(tok_path)
    out = str(tmp_path / "out")
    result = run_tool("--input", sft_jsonl, "--tokenizer", tok_path, "--output", out, "--seq-length", "256")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and f"{N} conversations" in result.stderr and "warning" not in result.stderr
    rows = [json.loads(line) for line in open(os.path.join(out, "rendered.jsonl"))]
    assert len(rows) == N and rows[0]["input_ids"] == tokenizer.encode(rows[0]["text"])
    assert json.load(open(os.path.join(out, "stats.json")))["num_longer_than_seq_length"] > 0
    bad = write_lines(tmp_path / "bad.jsonl", [open(sft_jsonl).readline().strip(), "{nope"])
    failed = run_tool("--input", bad, "--tokenizer", tok_path, "--output", str(tmp_path / "r.jsonl"))
    assert failed.returncode == 1 and "bad.jsonl:2: malformed JSON" in failed.stderr
    skipped = run_tool("--input", bad, "--tokenizer", tok_path, "--output", str(tmp_path / "r.jsonl"),
                       "--skip-bad-lines")
    assert skipped.returncode == 0 and "1 conversations" in skipped.stderr and "skipped 1 bad lines" in skipped.stderr


def test_prepare_sft_tool_refuses_bad_arguments_and_outputs(tmp_path, sft_jsonl, tokenizer):
    tok_path = str(tmp_path / "tok.json")
    tokenizer.save(tok_path)
    args = ["--input", sft_jsonl, "--tokenizer", tok_path]
    for seq_length in ("-1", "0"):
        failed = run_tool(*args, "--output", str(tmp_path / "r.jsonl"), "--seq-length", seq_length)
        assert failed.returncode == 2 and "argument --seq-length: must be a positive integer" in failed.stderr
    (tmp_path / "file").write_text("")
    (tmp_path / "taken.jsonl").mkdir()
    for output in (tmp_path / "file" / "out.jsonl", tmp_path / "file" / "out", tmp_path / "taken.jsonl"):
        failed = run_tool(*args, "--output", str(output))
        assert failed.returncode == 2 and f"error: cannot write {output}: " in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
    assert sorted(os.listdir(tmp_path)) == ["file", "taken.jsonl", "tok.json"]  # no temporary file left
    assert os.listdir(tmp_path / "taken.jsonl") == []
