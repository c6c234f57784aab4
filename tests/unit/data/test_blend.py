"""Megatron-style weighted interleaving."""

import numpy as np
import pytest
import torch

from longcat.data.blend import BlendedDataset


class Tagged:
    """Epoch-cycling stand-in: sample c of dataset `tag` is [tag, c]."""

    def __init__(self, tag, length=5):
        self.tag, self.length = tag, length

    def __len__(self):
        return self.length

    def __getitem__(self, c):
        return {"input_ids": torch.tensor([self.tag, c])}


def test_proportions_track_weights_at_every_prefix():
    weights = [0.5, 0.3, 0.2]
    blend = BlendedDataset([Tagged(0), Tagged(1), Tagged(2)], [5, 3, 2], seed=0)
    sources = np.array([blend.source(i)[0] for i in range(10_000)])
    for n in (10, 100, 1000, 10_000):
        counts = np.bincount(sources[:n], minlength=3)
        assert np.all(np.abs(counts - np.array(weights) * n) <= 1.0), (n, counts)


def test_each_component_is_served_in_order_and_indices_reproduce():
    blend = BlendedDataset([Tagged(0), Tagged(1)], [0.7, 0.3], seed=3)
    seen = {0: [], 1: []}
    for i in range(500):
        sample = blend[i]["input_ids"].tolist()
        seen[sample[0]].append(sample[1])
    assert seen[0] == list(range(len(seen[0]))) and seen[1] == list(range(len(seen[1])))
    again = BlendedDataset([Tagged(0), Tagged(1)], [0.7, 0.3], seed=3)
    assert [again.source(i) for i in reversed(range(500))] == [blend.source(i) for i in reversed(range(500))]
    assert len(blend) == 10


def test_megatron_order_for_equal_weights_up_to_tie_breaking():
    blend = BlendedDataset([Tagged(0), Tagged(1)], [1, 1], seed=0)
    first = [blend.source(i)[0] for i in range(8)]
    assert first in ([0, 1] * 4, [1, 0] * 4)


@pytest.mark.parametrize("weights,message", [([1, 0], "positive"), ([1], "2 datasets but 1 weights"),
                                             ([1, float("nan")], "finite")])
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        BlendedDataset([Tagged(0), Tagged(1)], weights, seed=0)
    with pytest.raises(ValueError, match="at least one dataset"):
        BlendedDataset([], [], seed=0)
