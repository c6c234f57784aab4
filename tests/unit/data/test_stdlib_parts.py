import pytest
from conftest import TEST_CORPUS_BYTES, TEST_VOCAB

from longcat.config.schema import DataConfig
from longcat.data import build_pretrain_data


def _cfg(cache, sources):
    return DataConfig(cache_dir=cache, corpus_max_bytes=TEST_CORPUS_BYTES, seq_length=32, micro_batch_size=2,
                      global_batch_size=4, sources=sources)


def test_stage_mixture_of_stdlib_parts(corpus_cache):
    data = build_pretrain_data(_cfg(corpus_cache, [{"path": "stdlib:docs", "weight": 0.3},
                                                   {"path": "stdlib:code", "weight": 0.7}]),
                               vocab_size=TEST_VOCAB, dp_rank=0, dp_size=1, progress=False)
    batch = next(iter(data.train))
    assert batch["input_ids"].shape == (2, 32)
    ds = data.train.dataset
    picked = [ds.source(i)[0] for i in range(200)]
    assert 0.25 <= picked.count(0) / 200 <= 0.35  # docs share of the blend


def test_docs_part_is_prose_not_code(corpus_cache):
    from longcat.data.tokenizer import load_tokenizer

    data = build_pretrain_data(_cfg(corpus_cache, [{"path": "stdlib:docs", "weight": 1.0}]),
                               vocab_size=TEST_VOCAB, dp_rank=0, dp_size=1, progress=False)
    tok = load_tokenizer(data.tokenizer_path)
    text = tok.decode(next(iter(data.train))["input_ids"][0].tolist())
    assert "def " not in text and "import " not in text.split("\n")[0][:7]


def test_unknown_part_is_an_error(corpus_cache):
    with pytest.raises(ValueError, match="stdlib parts"):
        build_pretrain_data(_cfg(corpus_cache, [{"path": "stdlib:poetry"}]), vocab_size=TEST_VOCAB,
                            dp_rank=0, dp_size=1, progress=False)
