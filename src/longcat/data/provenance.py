"""Which tokenizer made a ``.bin/.idx`` pair, and whether the run's tokenizer and model fit it.

Megatron's ``.idx`` records the token dtype but not the tokenizer, so a pair tokenized with one
tokenizer trains silently under another (wrong document separators, garbage text). Preprocessing
(``tokenize_to_indexed``: ``tools/preprocess_data.py``, the stdlib corpus) therefore writes a record
beside the pair, ``PREFIX.meta.json``::

    {"format": "longcat-indexed-meta/1", "eod_id": 0, "pad_id": 1, "tokenizer_vocab_size": 8192,
     "tokenizer_vocab_sha256": "...", "tokenizer_path": "...", "append_eod": true}

and ``check_data_tokenizer`` compares it with the run's tokenizer before training. Data without a
record (made by Megatron-LM or an older longcat) is checked as far as the data allows: every id must
lie below the tokenizer's size, and when every document ends with one same token that is not the
tokenizer's end-of-document id a warning names both (``--append-eod`` with another tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import numpy as np

from longcat.atomic_files import write_text_atomic
from longcat.data.indexed import IndexedDataset
from longcat.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

RECORD_FORMAT = "longcat-indexed-meta/1"


def record_path(path_prefix: str) -> str:
    return path_prefix + ".meta.json"


def tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """sha256 over the (token, id) pairs, special tokens included: equal for re-saved copies of a file."""
    vocab = tokenizer._tokenizer.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def remove_data_record(path_prefix: str) -> None:
    """Drop a pair's record before the pair is replaced, so a crash never pairs new data with an old record."""
    try:
        os.remove(record_path(path_prefix))
    except FileNotFoundError:
        pass


def write_data_record(path_prefix: str, tokenizer: TextTokenizer, *, append_eod: bool) -> None:
    """Write ``PREFIX.meta.json`` for a pair ``tokenizer`` just made (atomically)."""
    record = {"format": RECORD_FORMAT, "eod_id": tokenizer.eod_id, "pad_id": tokenizer.pad_id,
              "tokenizer_vocab_size": tokenizer.vocab_size, "tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer),
              "tokenizer_path": os.path.abspath(tokenizer.path) if tokenizer.path else "", "append_eod": append_eod}
    path = record_path(path_prefix)
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))


def read_data_record(path_prefix: str) -> Optional[dict]:
    """The pair's record, or None when it has none.

    Raises:
        ValueError: the record exists but is not a longcat record (naming the file).
    """
    path = record_path(path_prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable data record ({e}); delete it or re-run preprocessing") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not a {RECORD_FORMAT} record; delete it or re-run preprocessing")
    return record


def check_tokenizer_fits_model(tokenizer: TextTokenizer, vocab_size: int) -> None:
    """Raises ValueError when the tokenizer has more ids than the model's embedding rows."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but model.vocab_size={vocab_size}: "
            f"set model.vocab_size >= {tokenizer.vocab_size} or use the tokenizer the model was built for")


def check_data_tokenizer(indexed: IndexedDataset, tokenizer: TextTokenizer, *, max_token_id: int) -> None:
    """The pair ``indexed`` was made by ``tokenizer``: its record agrees, or (no record) its ids fit.

    Args:
        indexed: the pair.
        tokenizer: the run's tokenizer (``data.tokenizer``, or the corpus's own).
        max_token_id: the largest id in the pair (``check_vocab`` returns it).

    Raises:
        ValueError: naming the pair and the tokenizer, when the record's EOD id, size or vocabulary
            differs from the tokenizer's, or an id is not below the tokenizer's size.
    """
    record = read_data_record(indexed.path_prefix)
    where = f"{indexed.bin_path} (record {record_path(indexed.path_prefix)})"
    if record is not None:
        if record.get("eod_id") != tokenizer.eod_id:
            raise ValueError(
                f"{where} was tokenized with end-of-document id {record.get('eod_id')} but the tokenizer "
                f"{tokenizer.path}'s <|endoftext|> is {tokenizer.eod_id}: documents would run together; pass the "
                f"tokenizer that made the data ({record.get('tokenizer_path') or 'see the record'})")
        if (record.get("tokenizer_vocab_size") != tokenizer.vocab_size
                or record.get("tokenizer_vocab_sha256") != tokenizer_fingerprint(tokenizer)):
            raise ValueError(
                f"{where} was tokenized with a different tokenizer ({record.get('tokenizer_vocab_size')} ids, "
                f"{record.get('tokenizer_path') or 'path unknown'}) than {tokenizer.path} ({tokenizer.vocab_size} "
                "ids, another vocabulary): pass the tokenizer that made the data, or re-tokenize it")
    if max_token_id >= tokenizer.vocab_size:
        raise ValueError(
            f"{indexed.bin_path} holds token id {max_token_id} but the tokenizer {tokenizer.path} has only "
            f"{tokenizer.vocab_size} ids: the data was tokenized with another tokenizer; pass the one that made it")
    if record is None:
        _warn_on_foreign_eod(indexed, tokenizer)


def _warn_on_foreign_eod(indexed: IndexedDataset, tokenizer: TextTokenizer) -> None:
    ranges = indexed.document_token_ranges()
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    last_ids = np.unique(indexed.tokens[ranges[:, 1] - 1]) if len(ranges) >= 2 else np.array([])
    if len(last_ids) == 1 and int(last_ids[0]) != tokenizer.eod_id:
        logger.warning("%s carries no tokenizer record and every document ends with token %d, not the tokenizer "
                       "%s's <|endoftext|> id %d: was it preprocessed with --append-eod by another tokenizer?",
                       indexed.bin_path, int(last_ids[0]), tokenizer.path, tokenizer.eod_id)
    else:
        logger.info("%s carries no tokenizer record (%s); checked only that its ids fit the tokenizer",
                    indexed.bin_path, record_path(indexed.path_prefix))
