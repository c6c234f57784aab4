"""DP sharding and exact resume of MicroBatchLoader."""

import itertools

import numpy as np
import pytest
import torch

from longcat.data.indexed import IndexedDataset, write_indexed_dataset
from longcat.data.sampler import MicroBatchLoader
from longcat.data.samples import GPTDataset, Split


class Indexed:
    """Sample i is [i, i, i, i]: batches reveal which global indices they hold."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        x = torch.full((4,), i, dtype=torch.int64)
        return {"input_ids": x, "labels": x, "token_mask": torch.ones(4, dtype=torch.bool)}


@pytest.mark.parametrize("dp_size,micro_batch_size", [(1, 4), (3, 2), (4, 1)])
def test_dp_shards_are_disjoint_and_complete(dp_size, micro_batch_size):
    steps = 5
    seen = []
    for rank in range(dp_size):
        loader = MicroBatchLoader(Indexed(), micro_batch_size=micro_batch_size, dp_rank=rank, dp_size=dp_size, seed=0)
        for _ in range(steps):
            batch = next(loader)
            assert batch["input_ids"].shape == (micro_batch_size, 4)
            ids = batch["input_ids"][:, 0].tolist()
            assert all((i // micro_batch_size) % dp_size == rank for i in ids)
            seen.extend(ids)
        assert loader.consumed_samples == steps * micro_batch_size * dp_size
    assert sorted(seen) == list(range(steps * micro_batch_size * dp_size))


def gpt_dataset(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 500, size=int(rng.integers(5, 80))) for _ in range(30)]
    write_indexed_dataset(str(tmp_path / "d"), docs, vocab_size=500)
    return GPTDataset(IndexedDataset(str(tmp_path / "d")), seq_length=8, eod_id=1, split=Split.TRAIN,
                      valid_fraction=0.1, seed=5)


def test_resume_sees_exactly_the_uninterrupted_batches(tmp_path):
    ds = gpt_dataset(tmp_path)
    steps = 3 * len(ds) // 4 + 2  # crosses epoch boundaries
    for rank in range(2):
        def make(rank: int = rank) -> MicroBatchLoader:
            return MicroBatchLoader(ds, micro_batch_size=2, dp_rank=rank, dp_size=2, seed=5)

        reference = list(itertools.islice(make(), steps))
        first = make()
        head = list(itertools.islice(first, steps // 2))
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(dict(state))
        tail = list(itertools.islice(resumed, steps - steps // 2))
        for expected, got in zip(reference, head + tail, strict=True):
            for key in expected:
                assert torch.equal(expected[key], got[key])


def test_resume_with_new_layout_and_bad_states():
    loader = MicroBatchLoader(Indexed(), micro_batch_size=2, dp_rank=0, dp_size=2, seed=1)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    assert state["consumed_samples"] == 12
    wider = MicroBatchLoader(Indexed(), micro_batch_size=3, dp_rank=1, dp_size=2, seed=1)
    wider.load_state_dict(state)  # 12 is a multiple of 3 x 2
    assert wider.micro_batch_indices().tolist() == [15, 16, 17]
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x dp = 8"):
        MicroBatchLoader(Indexed(), micro_batch_size=4, dp_rank=0, dp_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="data seed 1 but this run uses 2"):
        MicroBatchLoader(Indexed(), micro_batch_size=2, dp_rank=0, dp_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dp_rank=2 must lie in \[0, dp_size=2\)"):
        MicroBatchLoader(Indexed(), micro_batch_size=2, dp_rank=2, dp_size=2, seed=1)
