"""Weighted, deterministic interleaving of several sample datasets (Megatron's BlendedDataset).

Sample i of the blend comes from the dataset whose served count lags furthest behind its share:
``argmax_d (w_d * max(i, 1) - served_d)`` with normalized weights w, as in Megatron's
``build_blending_indices`` (megatron/core/datasets/helpers.cpp). The c-th sample served from dataset
d is ``datasets[d][c]``; components are epoch-cycling (``GPTDataset``), so the blend never runs dry,
and after any n samples dataset d has served about ``w_d * n`` (within one sample in the tests).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class BlendedDataset:
    """Interleave ``datasets`` by ``weights``; index i -> (dataset, its sample) is reproducible.

    ``len(blend)`` is the sum of the components' lengths (one nominal epoch); ``blend[i]`` accepts
    any ``i >= 0``. The assignment is built lazily in growing chunks and cached.

    Args:
        datasets: epoch-cycling sample datasets (``ds[c]`` valid for every c >= 0).
        weights: relative weights, positive and finite; normalized here.
        seed: orders the datasets for breaking exact ties in the deficit (Megatron breaks them by
            position); the interleaving is otherwise fully determined by the weights.

    Raises:
        ValueError: when there are no datasets, the counts differ, or a weight is not positive.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int):
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset; list data.sources")
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights {list(weights)} must all be positive and finite; drop zero-weight sources")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.seed = seed
        self._tie_order = np.random.default_rng([seed, 2]).permutation(len(datasets))
        self._dataset_index = np.zeros(0, dtype=np.int64)  # [built] which dataset serves sample i
        self._dataset_sample_index = np.zeros(0, dtype=np.int64)  # [built] its c-th sample
        self._served = [0] * len(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def source(self, index: int) -> tuple[int, int]:
        """(dataset position, sample index within it) that blend sample ``index >= 0`` serves."""
        if index < 0:
            raise IndexError(f"blend index {index} must be >= 0")
        if index >= len(self._dataset_index):
            self._build(max(index + 1, 2 * len(self._dataset_index), 4096))
        return int(self._dataset_index[index]), int(self._dataset_sample_index[index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        d, c = self.source(index)
        return self.datasets[d][c]

    def _build(self, size: int) -> None:
        start = len(self._dataset_index)
        dataset_index = np.empty(size - start, dtype=np.int64)
        sample_index = np.empty(size - start, dtype=np.int64)
        weights = [float(self.weights[d]) for d in self._tie_order]
        order = [int(d) for d in self._tie_order]
        served = self._served
        for j, i in enumerate(range(start, size)):
            scale = max(i, 1.0)
            best, best_error = 0, -np.inf
            for pos, d in enumerate(order):
                error = weights[pos] * scale - served[d]
                if error > best_error:
                    best, best_error = d, error
            dataset_index[j] = best
            sample_index[j] = served[best]
            served[best] += 1
        self._dataset_index = np.concatenate([self._dataset_index, dataset_index])
        self._dataset_sample_index = np.concatenate([self._dataset_sample_index, sample_index])
