"""Resumable, data-parallel-sharded micro-batches, read in the main process.

Legend: B = micro-batch size, S = seq_length, dp = data-parallel degree, r = this rank.

All ranks walk one global sample stream ``dataset[0], dataset[1], ...`` (the dataset shuffles and
cycles epochs itself). Global sample i belongs to dp rank ``(i // B) % dp``: one step of all ranks
consumes the B * dp samples ``[c, c + B*dp)`` from the global position c (``consumed_samples``),
rank r taking ``[c + r*B, c + (r+1)*B)``. Ranks therefore never share a sample, together they cover
the stream, and the position is the same number on every rank, which is all a checkpoint must hold
(as Megatron's ``consumed_samples``). No worker processes: samples are memmap slices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class MicroBatchLoader:
    """Infinite iterator of this rank's micro-batches: dicts of stacked [B, S] tensors.

    Each ``next()`` returns ``{input_ids: [B, S] int64, labels: [B, S] int64, token_mask: [B, S]
    bool}`` and advances ``consumed_samples`` by B * dp (the global count, over all ranks).

    Args:
        dataset: epoch-cycling samples (``GPTDataset`` or ``BlendedDataset``): ``dataset[i]`` for
            every i >= 0 returns a dict of [S] tensors.
        micro_batch_size: B, samples per micro-batch on this rank.
        dp_rank: r, this rank's position in the data-parallel group, 0 <= r < dp.
        dp_size: dp, the data-parallel degree.
        seed: the data seed the dataset was shuffled with; recorded in ``state_dict`` so that a
            resume against differently shuffled data fails instead of silently changing batches.

    Raises:
        ValueError: for B < 1, dp < 1 or r outside [0, dp).
    """

    def __init__(self, dataset: Any, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size}) and dp_size >= 1")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = 0  # global, over all dp ranks

    @property
    def samples_per_step(self) -> int:
        """B * dp: global samples consumed by one micro-batch on every rank."""
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> float:
        """Fractional epochs of the dataset consumed so far (for logging)."""
        return self.consumed_samples / len(self.dataset)

    def micro_batch_indices(self) -> np.ndarray:
        """[B] int64: the global sample indices of this rank's next micro-batch."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    def __iter__(self) -> MicroBatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = collate([self.dataset[int(i)] for i in self.micro_batch_indices()])
        self.consumed_samples += self.samples_per_step
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position to resume from; identical on every dp rank."""
        return {
            "consumed_samples": self.consumed_samples,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["consumed_samples"]``; the next batch is the one the uninterrupted run saw.

        B and dp may change between runs as long as the position falls on a step boundary of the new
        layout (a multiple of B * dp).

        Raises:
            ValueError: when the seed differs, or the position is not a multiple of the new B * dp.
        """
        consumed = int(state["consumed_samples"])
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"the data state was saved with data seed {state['seed']} but this run uses {self.seed}; "
                "the sample order would differ: restore data.seed or start fresh"
            )
        if consumed < 0 or consumed % self.samples_per_step:
            raise ValueError(
                f"consumed_samples={consumed} from the checkpoint (saved with micro_batch_size="
                f"{state.get('micro_batch_size')}, dp={state.get('dp_size')}) is not a multiple of "
                f"micro_batch_size x dp = {self.samples_per_step} now; keep a layout that divides it"
            )
        self.consumed_samples = consumed


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of [S] sample dicts into one dict of [B, S] tensors."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
