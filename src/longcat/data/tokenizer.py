"""A thin wrapper over a Hugging Face ``tokenizers`` ``tokenizer.json`` with the ids training needs."""

from __future__ import annotations

import os
from typing import Sequence

from tokenizers import Tokenizer

from longcat.atomic_files import atomic_path

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class TextTokenizer:
    """Encode/decode text with a ``tokenizers.Tokenizer``; knows its end-of-document and pad ids.

    Attributes:
        path: the ``tokenizer.json`` it was loaded from.
        vocab_size: number of ids including added special tokens; every id is < vocab_size.
        eod_id: id of ``<|endoftext|>``, appended after each document.
        pad_id: id of ``<|pad|>``.
    """

    def __init__(self, tokenizer: Tokenizer, *, path: str = ""):
        self.path = path
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._special_id(EOD_TOKEN)
        self.pad_id = self._special_id(PAD_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"tokenizer {self.path or '(in memory)'} has no {token!r} token; train it with "
                f"special_tokens=[{EOD_TOKEN!r}, {PAD_TOKEN!r}] (see longcat.data.corpus.train_bpe_tokenizer)"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend (no special tokens added)."""
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens such as ``<|endoftext|>`` are kept unless skipped."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        """Write ``tokenizer.json`` to ``path`` (atomically: temporary file, then rename)."""
        with atomic_path(path) as tmp:
            self._tokenizer.save(str(tmp))


def load_tokenizer(path: str) -> TextTokenizer:
    """Load a ``tokenizer.json`` made by ``tokenizers`` (e.g. by ``tools/prepare_corpus.py``).

    Raises:
        ValueError: naming the file, when it is missing, unparsable, or lacks ``<|endoftext|>`` or
            ``<|pad|>``.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"tokenizer file {path} does not exist; pass the tokenizer.json that tokenized the data "
            "(tools/prepare_corpus.py writes one beside the stdlib corpus)"
        )
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ValueError(f"cannot parse tokenizer file {path}: {e}; pass a tokenizers tokenizer.json") from e
    return TextTokenizer(tokenizer, path=path)
