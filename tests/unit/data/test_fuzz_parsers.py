"""Fuzzing what the existing hypothesis tests do not reach.

Already fuzzed elsewhere: the ``.idx`` parser (test_indexed_dataset.py), the chat JSONL reader
(test_sft_dataset.py) and the chat parser/renderer (test_chat_render.py). Here:

- the JSONL preprocessor (``preprocess_files``, behind tools/preprocess_data.py): arbitrary bytes, JSON
  of every shape, lone surrogate escapes, ``.txt`` files; only ``ValueError`` (``FILE:LINE: ...``), and
  with ``skip_bad_lines`` every non-blank line is either a document or counted as skipped;
- the training-time read path over a well-formed pair with arbitrary token values and lengths
  (``check_vocab``, ``GPTDataset``): only ``ValueError``, and a dataset that loads serves every sample.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat.data.corpus import preprocess_files, train_bpe_tokenizer
from longcat.data.indexed import DTYPE_CODES, IndexedDataset, write_indexed_dataset
from longcat.data.samples import GPTDataset, Split, check_vocab


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_bpe_tokenizer(["alpha beta gamma delta {} [] \" \\"] * 10, vocab_size=300, progress=False).save(path)
    return path


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "body", "x"]), inner,
                                                                 max_size=3),
    max_leaves=6,
)
LINES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=30).map(lambda t: json.dumps({"text": t}).encode()),
    st.sampled_from([b'{"text": "a\\ud800b"}', b'{"text": "\\udfff"}', b'{"text": "ok"}', b"", b"   ", b"\xff\xfe",
                     b'{"text": "x"', b"[", b"NaN", b'{"text": "a", "text": 3}']),
    st.binary(max_size=30),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, max_size=8), txt=st.none() | st.binary(max_size=40), skip=st.booleans())
def test_fuzz_jsonl_preprocessor_raises_only_value_error(tokenizer_path, lines, txt, skip):
    with tempfile.TemporaryDirectory() as tmp:
        data = b"\n".join(lines)
        Path(tmp, "in.jsonl").write_bytes(data)
        inputs = [str(Path(tmp, "in.jsonl"))]
        if txt is not None:
            Path(tmp, "doc.txt").write_bytes(txt)
            inputs.append(str(Path(tmp, "doc.txt")))
        prefix = str(Path(tmp, "out"))
        try:
            stats = preprocess_files(inputs, tokenizer_path=tokenizer_path, output_prefix=prefix,
                                     skip_bad_lines=skip, progress=False)
        except ValueError as e:
            message = str(e)
            assert re.match(r".*in\.jsonl:\d+: ", message) or message.startswith("no documents to write"), message
            assert not Path(prefix + ".bin").exists() and not Path(prefix + ".idx").exists()
            return
        non_blank = sum(1 for raw in io.BytesIO(data) if raw.strip())
        assert stats.num_documents - (txt is not None) + stats.skipped_lines == non_blank
        assert skip or stats.skipped_lines == 0
        assert IndexedDataset(prefix).num_documents == stats.num_documents


@settings(max_examples=150, deadline=None, database=None)
@given(
    code=st.sampled_from(sorted(c for c, d in DTYPE_CODES.items() if d.kind in "iu")),
    lengths=st.lists(st.integers(0, 40), max_size=6),
    seed=st.integers(0, 2**16),
    seq_length=st.integers(1, 24),
    vocab_size=st.integers(1, 300),
)
def test_fuzz_token_data_read_path_raises_only_value_error(code, lengths, seed, seq_length, vocab_size):
    dtype = DTYPE_CODES[code]
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    docs = [rng.integers(max(info.min, -5), min(info.max, 400) + 1, size=n).astype(dtype) for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp, "d"))
        write_indexed_dataset(prefix, docs, dtype=dtype)
        indexed = IndexedDataset(prefix)
        try:
            check_vocab(indexed, vocab_size, eod_id=0)
            datasets = [GPTDataset(indexed, seq_length=seq_length, eod_id=0, split=split, valid_fraction=0.5,
                                   seed=seed) for split in Split]
        except ValueError:
            return
        for ds in datasets:
            for i in range(min(len(ds), 20)):
                sample = ds[i]
                assert sample["input_ids"].shape == (seq_length,)
                assert 0 <= int(sample["input_ids"].min()) and int(sample["input_ids"].max()) < vocab_size
        del indexed, datasets
