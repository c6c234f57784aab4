"""Packing, splitting, shuffling and vocab checks of GPTDataset."""

import numpy as np
import pytest
import torch

from longcat.data.indexed import IndexedDataset, write_indexed_dataset
from longcat.data.samples import GPTDataset, Split, check_vocab, split_documents

EOD = 1


def recognisable_docs(num_docs=40, seed=0):
    """Document d holds ids 1000*(d+1) + j: every token says which document and position it is."""
    rng = np.random.default_rng(seed)
    return [[1000 * (d + 1) + j for j in range(int(rng.integers(1, 60)))] for d in range(num_docs)]


def make(tmp_path, docs, *, split=Split.TRAIN, seq_length=16, seed=7, valid_fraction=0.25, name="d"):
    prefix = str(tmp_path / name)
    write_indexed_dataset(prefix, docs, vocab_size=65000)
    return GPTDataset(IndexedDataset(prefix), seq_length=seq_length, eod_id=EOD, split=split,
                      valid_fraction=valid_fraction, seed=seed)


@pytest.mark.parametrize("split", [Split.TRAIN, Split.VALID])
def test_documents_reassemble_exactly_from_consecutive_samples(tmp_path, split):
    docs = recognisable_docs()
    ds = make(tmp_path, docs, split=split, seq_length=16)
    stream = np.concatenate([docs[d] + [EOD] for d in ds.document_ids])
    inputs = np.concatenate([ds.sample(k)["input_ids"].numpy() for k in range(len(ds))])
    assert len(ds) == (len(stream) - 1) // 16
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])  # nothing lost, nothing repeated
    for k in range(len(ds)):
        s = ds.sample(k)
        np.testing.assert_array_equal(s["labels"].numpy(), stream[k * 16 + 1 : k * 16 + 17])
        assert s["input_ids"].dtype == torch.int64 and s["labels"].dtype == torch.int64
        assert s["token_mask"].dtype == torch.bool and bool(s["token_mask"].all())
        assert s["input_ids"].shape == (16,)


def test_eod_not_doubled_when_preprocessed_with_append_eod(tmp_path):
    docs = recognisable_docs(10)
    plain = make(tmp_path, docs, name="plain")
    with_eod = make(tmp_path, [d + [EOD] for d in docs], name="eod")
    assert len(plain) == len(with_eod)
    for k in range(len(plain)):
        assert torch.equal(plain.sample(k)["input_ids"], with_eod.sample(k)["input_ids"])


def test_split_is_disjoint_complete_and_seeded(tmp_path):
    docs = recognisable_docs(50) + [[]]  # the empty document joins no split
    train = make(tmp_path, docs, split=Split.TRAIN)
    valid = make(tmp_path, docs, split=Split.VALID)
    assert set(train.document_ids).isdisjoint(valid.document_ids)
    assert sorted(set(train.document_ids) | set(valid.document_ids)) == list(range(50))
    assert len(valid.document_ids) == round(0.25 * 50)
    again = make(tmp_path, docs, split=Split.VALID)
    np.testing.assert_array_equal(valid.document_ids, again.document_ids)
    other = split_documents(np.ones(50), valid_fraction=0.25, seed=8)[Split.VALID]
    assert not np.array_equal(valid.document_ids, other)


def test_shuffle_deterministic_and_reshuffled_each_epoch(tmp_path):
    ds = make(tmp_path, recognisable_docs(60), seq_length=8)
    n = len(ds)
    epoch0 = [ds.sample_index(i) for i in range(n)]
    epoch1 = [ds.sample_index(i) for i in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    fresh = make(tmp_path, recognisable_docs(60), seq_length=8, name="again")
    assert [fresh.sample_index(i) for i in range(2 * n)] == epoch0 + epoch1
    assert torch.equal(ds[n + 3]["input_ids"], ds.sample(epoch1[3])["input_ids"])
    other_seed = make(tmp_path, recognisable_docs(60), seq_length=8, seed=99, name="other")
    assert [other_seed.sample_index(i) for i in range(n)] != epoch0


def test_empty_dataset_and_too_small_split_raise_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.bin is empty.*non-empty"):
        make(tmp_path, [], name="empty")
    with pytest.raises(ValueError, match=r"one\.bin has 1 non-empty documents"):
        make(tmp_path, [[5, 6, 7]], name="one")
    docs = [[5] * 100, [6] * 3, [7] * 100, [8] * 100]
    with pytest.raises(ValueError, match=r"valid split of .*small\.bin has .* lower data\.seq_length"):
        for seed in range(20):  # some seed puts the 3-token document alone in valid
            make(tmp_path, docs, split=Split.VALID, seq_length=8, seed=seed, name="small")


def test_check_vocab(tmp_path):
    ds = make(tmp_path, recognisable_docs(10))
    top = max(max(d) for d in recognisable_docs(10))
    assert check_vocab(ds, top + 1) == top
    assert check_vocab(ds.indexed, top + 1, eod_id=EOD) == top
    with pytest.raises(ValueError, match=rf"d\.bin holds token id {top} >= the model's vocab_size {top}"):
        check_vocab(ds, top)
    with pytest.raises(ValueError, match="vocab_size 100"):
        check_vocab(ds.indexed, 100)
