"""build_pretrain_data: DataConfig -> this rank's loaders, for both corpus kinds."""

import numpy as np
import pytest
import torch

from longcat.config.schema import DataConfig, DataSource
from longcat.data import build_pretrain_data
from longcat.data.corpus import train_bpe_tokenizer
from longcat.data.indexed import write_indexed_dataset


@pytest.fixture
def files_config(tmp_path):
    tokenizer = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer(["one two three"] * 5, vocab_size=300, progress=False).save(tokenizer)
    rng = np.random.default_rng(0)
    for name, low in [("a", 2), ("b", 200)]:
        docs = [rng.integers(low, low + 50, size=int(rng.integers(20, 60))) for _ in range(40)]
        write_indexed_dataset(str(tmp_path / name), docs, vocab_size=300)
    return DataConfig(
        corpus="files", tokenizer=tokenizer, seq_length=16, micro_batch_size=2, global_batch_size=4,
        valid_fraction=0.1,
        sources=[DataSource(str(tmp_path / "a"), 3.0), {"path": str(tmp_path / "b"), "weight": 1.0}],
    )


def test_files_corpus_blends_shards_and_validates(files_config):
    ranks = [build_pretrain_data(files_config, vocab_size=300, dp_rank=r, dp_size=2, progress=False) for r in range(2)]
    batches = [[next(data.train) for _ in range(10)] for data in ranks]
    tokens = torch.cat([b["input_ids"] for rank in batches for b in rank])
    assert tokens.shape == (40, 16)
    from_a = (tokens < 200).all(dim=1).float().mean().item()  # samples of source a have ids < 52
    assert from_a == pytest.approx(0.75, abs=0.05)
    data = ranks[0]
    assert data.eod_id == 0 and data.pad_id == 1
    first, second = data.valid_batches(3, 2), data.valid_batches(3, 2)
    assert len(first) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    other = ranks[1].valid_batches(3, 2)
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])  # ranks evaluate different shards


def test_files_corpus_errors(files_config):
    with pytest.raises(ValueError, match=r"holds token id 2\d\d >= the model's vocab_size 100"):
        build_pretrain_data(files_config, vocab_size=100, dp_rank=0, dp_size=1)
    files_config.tokenizer = ""
    with pytest.raises(ValueError, match="data.corpus=files needs data.tokenizer"):
        build_pretrain_data(files_config, vocab_size=300, dp_rank=0, dp_size=1)
    files_config.global_batch_size = 3
    with pytest.raises(ValueError, match="global_batch_size=3"):
        build_pretrain_data(files_config, vocab_size=300, dp_rank=0, dp_size=1)


def test_stdlib_corpus(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), seq_length=32, micro_batch_size=2, global_batch_size=2,
                     valid_fraction=0.2, corpus_max_bytes=60_000)
    data = build_pretrain_data(cfg, vocab_size=400, dp_rank=0, dp_size=1, progress=False)
    batch = next(data.train)
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < 400
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert data.tokenizer_path.startswith(str(tmp_path / "stdlib-v400-max60000"))
    with pytest.raises(ValueError, match="model.vocab_size=100 is too small"):
        build_pretrain_data(cfg, vocab_size=100, dp_rank=0, dp_size=1)
