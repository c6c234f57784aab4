"""GPT pretraining samples over one indexed dataset: documents packed into fixed-length windows.

Legend: S = seq_length, T = the split's token stream length, N = samples per epoch.

The split's documents (ascending document id) are concatenated into one token stream, each followed
by the end-of-document token (unless its last token already is EOD, as in data preprocessed with
``--append-eod``; empty documents are dropped). Sample k is the window ``stream[k*S : k*S + S + 1]``:
windows overlap by one token, so ``input_ids = window[:-1]`` and ``labels = window[1:]``, and the
inputs of consecutive samples tile the stream with no token lost or repeated. N = (T - 1) // S; the
last (T - 1) % S tokens are not used as inputs.

Samples are served in a per-epoch permutation drawn from ``numpy.random.default_rng``; index
``i`` of the epoch-cycling sample stream is sample ``perm_e[i % N]`` of epoch ``e = i // N``, each
epoch with its own permutation. This mirrors Megatron's GPTDataset (document -> sample -> shuffle
index) without materializing the indices for a fixed number of epochs up front.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

import numpy as np
import torch

from longcat.data.indexed import IndexedDataset

IGNORE_INDEX = -100  # label of padded positions (token_mask False)

# Distinct streams of the seeded generator, so the split never correlates with a shuffle.
_SPLIT_STREAM = 0
_SHUFFLE_STREAM = 1


class Split(str, enum.Enum):
    TRAIN = "train"
    VALID = "valid"


def split_documents(
    lengths: np.ndarray, *, valid_fraction: float, seed: int, name: str = "dataset"
) -> dict[Split, np.ndarray]:
    """Partition the non-empty documents into train and valid ids by a seeded choice.

    Args:
        lengths: [num_documents] token count of each document; empty ones join no split.
        valid_fraction: share of non-empty documents in the valid split, in (0, 1); at least one.
        seed: seeds ``numpy.random.default_rng([seed, 0])``.
        name: the file named in errors.

    Returns:
        {Split.TRAIN: ids, Split.VALID: ids}, each ascending int64, disjoint.

    Raises:
        ValueError: when valid_fraction is outside (0, 1) or fewer than two documents are non-empty.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction} must lie in (0, 1)")
    candidates = np.flatnonzero(np.asarray(lengths) > 0)
    if len(candidates) < 2:
        raise ValueError(
            f"{name} has {len(candidates)} non-empty documents; a train/valid split needs at least 2: "
            "add documents (for the stdlib corpus raise data.corpus_max_bytes)"
        )
    num_valid = min(len(candidates) - 1, max(1, round(valid_fraction * len(candidates))))
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    is_valid = np.zeros(len(candidates), dtype=bool)
    is_valid[rng.choice(len(candidates), size=num_valid, replace=False)] = True
    return {Split.TRAIN: candidates[~is_valid], Split.VALID: candidates[is_valid]}


class GPTDataset:
    """Packed next-token-prediction samples from one split of an ``IndexedDataset``.

    ``len(ds)`` is N, the samples per epoch; ``ds[i]`` accepts any ``i >= 0`` and cycles through
    epochs (see the module docstring), so a sampler may simply count up. ``ds.sample(k)`` is window k
    in stream order, unshuffled. Iterating yields one epoch.

    Args:
        indexed: the token data.
        seq_length: S, tokens per sample input.
        eod_id: the end-of-document token id appended after each document.
        split: which split of the seeded document partition to serve.
        valid_fraction: share of documents in the valid split (see ``split_documents``).
        seed: seeds the split and the per-epoch shuffles.

    Raises:
        ValueError: naming the file, for non-integer token data, seq_length < 1, or a split too small
            for one sample (with the fix).
    """

    def __init__(
        self, indexed: IndexedDataset, *, seq_length: int, eod_id: int, split: Split,
        valid_fraction: float, seed: int,
    ):
        name = indexed.bin_path
        if not np.issubdtype(indexed.dtype, np.integer):
            raise ValueError(f"{name} holds {indexed.dtype} values, not token ids; rebuild it with integer ids")
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        if indexed.num_documents == 0 or indexed.num_tokens == 0:
            raise ValueError(
                f"{name} is empty ({indexed.num_documents} documents, {indexed.num_tokens} tokens); "
                "point data.sources at a non-empty dataset or re-run preprocessing on non-empty input"
            )
        self.indexed = indexed
        self.seq_length = seq_length
        self.eod_id = eod_id
        self.split = Split(split)
        self.seed = seed

        ranges = indexed.document_token_ranges()  # [D, 2]
        self.document_ids = split_documents(
            ranges[:, 1] - ranges[:, 0], valid_fraction=valid_fraction, seed=seed, name=name
        )[self.split]
        starts, stops = ranges[self.document_ids, 0], ranges[self.document_ids, 1]
        ends_with_eod = indexed.tokens[stops - 1] == eod_id
        # Per split document: token range in .bin, whether to append EOD, and start in the stream.
        self._doc_starts = starts
        self._doc_stops = stops
        self._append_eod = ~ends_with_eod
        stream_lengths = (stops - starts) + self._append_eod
        self._stream_starts = np.concatenate([[0], np.cumsum(stream_lengths)]).astype(np.int64)
        self.num_stream_tokens = int(self._stream_starts[-1])
        self.num_samples = (self.num_stream_tokens - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(
                f"the {self.split.value} split of {name} has {self.num_stream_tokens} tokens in "
                f"{len(self.document_ids)} documents, fewer than seq_length + 1 = {seq_length + 1}: lower "
                "data.seq_length, raise data.valid_fraction, or use more data (data.corpus_max_bytes)"
            )
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return (self[i] for i in range(self.num_samples))

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """[N] int64: the sample order of ``epoch``, from ``default_rng([seed, 1, epoch])``."""
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
            self._permutations[epoch] = rng.permutation(self.num_samples)
            while len(self._permutations) > 2:  # a batch may straddle an epoch boundary
                self._permutations.popitem(last=False)
        return self._permutations[epoch]

    def sample_index(self, index: int) -> int:
        """The stream-order sample (window) served at epoch-cycling index ``index >= 0``."""
        if index < 0:
            raise IndexError(f"sample index {index} must be >= 0")
        epoch, position = divmod(int(index), self.num_samples)
        return int(self.epoch_permutation(epoch)[position])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample at epoch-cycling index ``index``: input_ids, labels [S] int64; token_mask [S] bool."""
        return make_sample(self.window(self.sample_index(index)))

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Window ``k`` in stream order (no shuffle), 0 <= k < N."""
        return make_sample(self.window(k))

    def window(self, k: int) -> np.ndarray:
        """[S + 1] int64: stream tokens [k*S, k*S + S + 1)."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"window {k} out of range for {self.num_samples} samples")
        position = k * self.seq_length
        remaining = self.seq_length + 1
        out = np.empty(remaining, dtype=np.int64)
        filled = 0
        # 'right' skips zero-length entries sharing a start with the next document.
        doc = int(np.searchsorted(self._stream_starts, position, side="right")) - 1
        offset = position - int(self._stream_starts[doc])
        while remaining:
            start, stop = int(self._doc_starts[doc]), int(self._doc_stops[doc])
            take = min(remaining, stop - start - offset) if offset < stop - start else 0
            if take > 0:
                out[filled : filled + take] = self.indexed.tokens[start + offset : start + offset + take]
                filled += take
                remaining -= take
            if remaining and self._append_eod[doc] and offset + take == stop - start:
                out[filled] = self.eod_id
                filled += 1
                remaining -= 1
            doc += 1
            offset = 0
        return out


def make_sample(window: np.ndarray) -> dict[str, torch.Tensor]:
    """{input_ids, labels: [S] int64, token_mask: [S] bool} from an [S + 1] token window (no padding)."""
    tokens = torch.from_numpy(np.ascontiguousarray(window, dtype=np.int64))
    return {
        "input_ids": tokens[:-1],
        "labels": tokens[1:],
        "token_mask": torch.ones(len(window) - 1, dtype=torch.bool),
    }


def check_vocab(dataset: IndexedDataset | GPTDataset, vocab_size: int, *, eod_id: int | None = None) -> int:
    """Check every token id (and ``eod_id``) lies in [0, vocab_size); return the largest id.

    The scan is a chunked numpy min/max over the memmapped ``.bin`` (about 1 GB/s).

    Raises:
        ValueError: naming the file, the offending id and the fix, when an id is negative or
            >= vocab_size.
    """
    indexed = dataset.indexed if isinstance(dataset, GPTDataset) else dataset
    if eod_id is None and isinstance(dataset, GPTDataset):
        eod_id = dataset.eod_id
    lo, hi = indexed.token_id_range() if indexed.num_tokens else (0, -1)
    if eod_id is not None:
        lo, hi = min(lo, eod_id), max(hi, eod_id)
    if lo < 0:
        raise ValueError(f"{indexed.bin_path} holds token id {lo} < 0; the data is corrupt: rebuild it")
    if hi >= vocab_size:
        raise ValueError(
            f"{indexed.bin_path} holds token id {hi} >= the model's vocab_size {vocab_size}; the data was "
            f"tokenized with a larger vocabulary: set model.vocab_size >= {hi + 1} or re-tokenize the data "
            "with a tokenizer of at most vocab_size ids"
        )
    return hi
