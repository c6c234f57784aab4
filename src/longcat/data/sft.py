"""Supervised fine-tuning samples from chat JSONL, in the pretraining sample format.

Legend: S = seq_length, T = tokens of one rendered conversation.

Each conversation is rendered and tokenized once (``longcat.data.chat.render_conversation``). A
sample is an [S + 1] token window, ``input_ids = window[:-1]``, and ``labels[t] = window[t + 1]``
where token t + 1 is an assistant (loss) token, else -100; ``token_mask`` is False on padding, whose
id is the tokenizer's ``<|pad|>``.

- ``Packing.PAD`` (default): one conversation per sample, padded on the RIGHT to S + 1 tokens.
- ``Packing.GREEDY``: conversations, each followed by ``<|endoftext|>`` (masked, as pretraining's
  document separator), are packed next-fit in a seeded order; a conversation that does not fit in
  the remaining room starts the next sample; a trailing EOD that does not fit is dropped. There is
  no attention reset, as in pretraining; no loss crosses a boundary, since the token after a
  conversation is EOD and the first token of a conversation is never an assistant token.

Conversations longer than S + 1 tokens are, by ``Overflow``: DROP (default; counted in
``stats.num_dropped``, since a cut conversation would teach answers that never end with
``</longcat_s>``), or TRUNCATE to their first S + 1 tokens (counted in ``stats.num_truncated``; one
left with no loss token is dropped instead).

The train/valid split is a seeded choice over conversations (``samples.split_documents``), taken
before the overflow policy, so it does not depend on S. Samples are served epoch-cycling in a
per-epoch seeded permutation, like ``GPTDataset``: ``ds[i]`` works for every i >= 0, so
``MicroBatchLoader`` can count up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Iterable, NamedTuple, Union

import numpy as np
import torch

from longcat.config.schema import (  # data.sft_packing / data.sft_overflow, re-exported
    Overflow,
    Packing,
)
from longcat.data.chat import (
    Conversation,
    RenderedConversation,
    parse_conversation,
    render_conversation,
)
from longcat.data.samples import IGNORE_INDEX, Split, split_documents
from longcat.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_SHUFFLE_STREAM = 1  # stream 0 is the split (split_documents)
_PACK_STREAM = 2


class LoadedConversations(NamedTuple):
    conversations: list[Conversation]
    num_skipped_lines: int  # malformed lines skipped with skip_bad_lines


@dataclasses.dataclass
class SFTStats:
    num_conversations: int = 0  # in this split, before the overflow policy
    num_skipped_lines: int = 0  # malformed input lines skipped (skip_bad_lines)
    num_dropped: int = 0  # longer than seq_length + 1 (Overflow.DROP), or no loss left after truncation
    num_truncated: int = 0
    num_samples: int = 0
    num_tokens: int = 0  # real (non-pad) tokens over all samples
    num_loss_tokens: int = 0  # labels != -100 over all samples


def read_conversations(path: Union[str, os.PathLike], *, skip_bad_lines: bool = False) -> LoadedConversations:
    """Parse a chat JSONL file: one ``messages`` or ShareGPT ``conversations`` record per line.

    Blank lines are ignored. A bad line (not UTF-8, malformed JSON, a malformed record, roles out of
    order, tool-call arguments that are not JSON, ...) raises, or with ``skip_bad_lines`` is skipped
    and counted.

    Raises:
        ValueError: ``FILE:LINE: problem`` for a bad line without ``skip_bad_lines``; for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"SFT input {path} does not exist; pass a .jsonl file of conversations")
    conversations, skipped = [], 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                except (json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{source}: malformed JSON ({e})") from None
                conversations.append(parse_conversation(record, source=source))
            except ValueError as e:
                if not skip_bad_lines:
                    raise ValueError(
                        f"{e}; fix the line, or skip and count bad lines with data.sft_skip_bad_lines=true "
                        "(tools/prepare_sft.py: --skip-bad-lines)") from None
                skipped += 1
    return LoadedConversations(conversations, skipped)


def load_conversations(
    path_or_records: Union[str, os.PathLike, Iterable[Any]], *, skip_bad_lines: bool = False
) -> LoadedConversations:
    """Conversations from a JSONL path, or from records (dicts, parsed as ``record i``, or Conversations)."""
    if isinstance(path_or_records, (str, os.PathLike)):
        return read_conversations(path_or_records, skip_bad_lines=skip_bad_lines)
    conversations, skipped = [], 0
    for k, record in enumerate(path_or_records):
        try:
            conversations.append(record if isinstance(record, Conversation) else
                                 parse_conversation(record, source=f"record {k}"))
        except ValueError:
            if not skip_bad_lines:
                raise
            skipped += 1
    return LoadedConversations(conversations, skipped)


class SFTDataset:
    """SFT samples ``{input_ids, labels: [S] int64, token_mask: [S] bool}`` of one split.

    ``len(ds)`` is the samples per epoch; ``ds[i]`` accepts any i >= 0 and cycles epochs in seeded
    permutations; ``ds.sample(k)`` is sample k unshuffled. ``ds.stats`` counts conversations, skipped
    lines, dropped/truncated conversations, tokens and loss tokens. Everything is tokenized in the
    constructor (a few thousand conversations per second on one core).

    Args:
        path_or_records: a chat JSONL path, or an iterable of records / ``Conversation``s.
        tokenizer: the model's tokenizer (best with ``chat.add_chat_special_tokens`` applied).
        seq_length: S.
        seed: seeds the split, the packing order and the per-epoch shuffles.
        split: which split to serve; valid_fraction: its share of conversations, in (0, 1).
        packing: ``Packing.PAD`` (default) or ``Packing.GREEDY`` (module docstring).
        overflow: what to do with conversations longer than S + 1 tokens (default DROP).
        skip_bad_lines: skip and count malformed input lines instead of raising.

    Raises:
        ValueError: for seq_length < 1, bad input (``FILE:LINE``), fewer than 2 conversations, or a
            split left with no sample (with the fix).
    """

    def __init__(
        self, path_or_records: Union[str, os.PathLike, Iterable[Any]], *, tokenizer: TextTokenizer,
        seq_length: int, seed: int, split: Split, valid_fraction: float, packing: Packing = Packing.PAD,
        overflow: Overflow = Overflow.DROP, skip_bad_lines: bool = False,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        name = os.fspath(path_or_records) if isinstance(path_or_records, (str, os.PathLike)) else "SFT records"
        self.seq_length = seq_length
        self.seed = seed
        self.split = Split(split)
        self.packing = Packing(packing)
        self.overflow = Overflow(overflow)
        self.pad_id = tokenizer.pad_id
        self.eod_id = tokenizer.eod_id
        loaded = load_conversations(path_or_records, skip_bad_lines=skip_bad_lines)
        if not loaded.conversations:
            raise ValueError(f"{name} holds no conversations ({loaded.num_skipped_lines} bad lines skipped)")
        chosen = split_documents(np.ones(len(loaded.conversations)), valid_fraction=valid_fraction, seed=seed,
                                 name=name)[self.split]
        self.stats = SFTStats(num_conversations=len(chosen), num_skipped_lines=loaded.num_skipped_lines)
        fitted = [self._fit(render_conversation(loaded.conversations[k], tokenizer=tokenizer)) for k in chosen]
        rendered = [r for r in fitted if r is not None]
        if not rendered:
            fix = ("raise data.seq_length or set data.sft_overflow=truncate" if self.overflow is Overflow.DROP else
                   "raise data.seq_length: with data.sft_overflow=truncate a conversation is still dropped when "
                   "no assistant token falls within its first seq_length + 1 tokens (its prompt is longer)")
            raise ValueError(
                f"the {self.split.value} split of {name} has no conversation that fits seq_length + 1 = "
                f"{seq_length + 1} tokens ({self.stats.num_dropped} of {len(chosen)} dropped): {fix}"
            )
        if self.packing is Packing.GREEDY:
            order = np.random.default_rng([seed, _PACK_STREAM]).permutation(len(rendered))
            rendered = self._pack([rendered[k] for k in order])
        self._windows = [self._window(ids, loss) for ids, loss in rendered]  # ([S+1] ids, [S+1] loss, real)
        self.num_samples = len(self._windows)
        self.stats.num_samples = self.num_samples
        self.stats.num_tokens = sum(real for _, _, real in self._windows)
        self.stats.num_loss_tokens = sum(int(loss[1:].sum()) for _, loss, _ in self._windows)
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()
        logger.info("SFT %s split of %s: %s", self.split.value, name, self.stats)

    def _fit(self, rendered: RenderedConversation) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, loss) within S + 1 tokens by the overflow policy, or None (dropped, counted)."""
        ids, loss = rendered.input_ids, rendered.loss_mask
        limit = self.seq_length + 1
        if len(ids) > limit:
            if self.overflow is Overflow.DROP or not loss[1:limit].any():
                self.stats.num_dropped += 1
                return None
            ids, loss = ids[:limit], loss[:limit]
            self.stats.num_truncated += 1
        return ids, loss

    def _pack(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Next-fit: [c1, EOD, c2, EOD, ...] per sample, each cut to S + 1 (only a trailing EOD is cut)."""
        limit, used = self.seq_length + 1, 0
        bins: list[list[tuple[np.ndarray, np.ndarray]]] = []
        current: list[tuple[np.ndarray, np.ndarray]] = []
        for ids, loss in items:
            if current and used + len(ids) > limit:
                bins.append(current)
                current, used = [], 0
            current.append((ids, loss))
            used += len(ids) + 1
        bins.append(current)
        eod = (np.array([self.eod_id], dtype=np.int64), np.zeros(1, dtype=bool))
        packed = []
        for parts in bins:
            joined = [piece for part in parts for piece in (part, eod)]
            packed.append((np.concatenate([p[0] for p in joined])[:limit],
                           np.concatenate([p[1] for p in joined])[:limit]))
        return packed

    def _window(self, ids: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Right-pad to S + 1: ([S+1] int64 ids, [S+1] bool loss, number of real input positions)."""
        pad = self.seq_length + 1 - len(ids)
        assert pad >= 0
        window = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
        window_loss = np.concatenate([loss, np.zeros(pad, dtype=bool)])
        return window, window_loss, min(len(ids), self.seq_length)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return (self[i] for i in range(self.num_samples))

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """[N] int64: the sample order of ``epoch``, from ``default_rng([seed, 1, epoch])``."""
        if epoch not in self._permutations:
            self._permutations[epoch] = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch]).permutation(
                self.num_samples)
            while len(self._permutations) > 2:  # a batch may straddle an epoch boundary
                self._permutations.popitem(last=False)
        return self._permutations[epoch]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample at epoch-cycling index ``index >= 0``: input_ids, labels [S] int64; token_mask [S] bool."""
        if index < 0:
            raise IndexError(f"sample index {index} must be >= 0")
        epoch, position = divmod(int(index), self.num_samples)
        return self.sample(int(self.epoch_permutation(epoch)[position]))

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Sample ``k`` in construction order (no shuffle), 0 <= k < N."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample {k} out of range for {self.num_samples} samples")
        window, loss, real = self._windows[k]
        labels = np.where(loss[1:], window[1:], IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "token_mask": torch.arange(self.seq_length) < real,
        }
