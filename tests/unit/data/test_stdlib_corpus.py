"""The embedded stdlib corpus and the tokenizer wrapper."""

import json
import os
import time

import pytest

from longcat.data.corpus import (
    prepare_stdlib_corpus,
    stdlib_source_files,
    train_bpe_tokenizer,
)
from longcat.data.indexed import IndexedDataset
from longcat.data.tokenizer import load_tokenizer

MAX_BYTES = 150_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("cache") / "stdlib")
    paths = prepare_stdlib_corpus(cache_dir, vocab_size=512, max_bytes=MAX_BYTES, progress=False)
    return cache_dir, paths


def test_corpus_files_tokenizer_and_manifest(corpus):
    cache_dir, paths = corpus
    files = stdlib_source_files(max_bytes=MAX_BYTES)
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts)
    with open(os.path.join(cache_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["file_count"] == len(files) and manifest["vocab_size"] == 512
    assert manifest["byte_count"] == sum(f.stat().st_size for f in files) <= MAX_BYTES
    tok = load_tokenizer(paths.tokenizer_path)
    ds = IndexedDataset(paths.prefix)
    assert tok.vocab_size == 512 and (tok.eod_id, tok.pad_id) == (0, 1)
    assert ds.num_documents == len(files) and manifest["num_tokens"] == ds.num_tokens
    first = ds.document(0).tolist()
    assert first[-1] == tok.eod_id  # written with EOD appended, as Megatron's --append-eod
    assert tok.decode(first[:-1]) == files[0].read_text(encoding="utf-8")


def test_second_call_is_cached(corpus):
    cache_dir, paths = corpus
    mtime = os.path.getmtime(paths.prefix + ".bin")
    start = time.perf_counter()
    assert prepare_stdlib_corpus(cache_dir, vocab_size=512, max_bytes=MAX_BYTES, progress=False) == paths
    assert time.perf_counter() - start < 1.0
    assert os.path.getmtime(paths.prefix + ".bin") == mtime


def test_external_tokenizer_and_bad_arguments(corpus, tmp_path):
    _, paths = corpus
    other = prepare_stdlib_corpus(str(tmp_path / "ext"), max_bytes=40_000, tokenizer_path=paths.tokenizer_path,
                                  progress=False)
    assert load_tokenizer(other.tokenizer_path).vocab_size == 512
    with pytest.raises(ValueError, match="max_bytes=10 admits no stdlib file"):
        prepare_stdlib_corpus(str(tmp_path / "none"), max_bytes=10, progress=False)
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 263"):
        prepare_stdlib_corpus(str(tmp_path / "tiny"), vocab_size=100, progress=False)


def test_tokenizer_roundtrip_batch_and_errors(tmp_path):
    tok = train_bpe_tokenizer(["def f(x):\n    return x + 1\n", "héllo wörld"] * 20, vocab_size=300, progress=False)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    tok = load_tokenizer(path)
    texts = ["def g(y):\n\treturn y\n", "naïve — ünïcode", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert [tok.decode(tok.encode(t)) for t in texts] == texts
    assert tok.decode([tok.eod_id]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="missing.json does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse tokenizer file .*bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
