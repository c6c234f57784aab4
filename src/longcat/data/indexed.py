"""Megatron-LM's indexed dataset: ``PREFIX.bin`` (token ids) plus ``PREFIX.idx`` (the index).

Byte-compatible with ``megatron/core/datasets/indexed_dataset.py`` (``_IndexWriter``/``_IndexReader``):
a file written here loads in Megatron-LM and vice versa. The ``.idx`` layout, all little-endian::

    offset  size        field
    0       9           magic b"MMIDIDX\\x00\\x00"
    9       8  <Q       version, always 1
    17      1  <B       dtype code of the .bin tokens (DTYPE_CODES below)
    18      8  <Q       sequence count N
    26      8  <Q       document count M (= number of documents + 1: document_indices starts at 0)
    34      4*N int32   sequence lengths, in tokens
    .       8*N int64   sequence pointers, byte offsets into .bin
    .       8*M int64   document indices: document d holds sequences [di[d], di[d+1])
    .       1*N int8    sequence modes (multimodal files only; accepted and ignored here)

The ``.bin`` is the sequences' tokens back to back. Megatron writes the pointers as the running byte
sum of the lengths, so a document is one contiguous token range; the reader insists on that.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterable, Optional

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8

# Megatron's DType enum, code -> numpy dtype.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}


def bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype for ``vocab_size`` ids: uint16 below 65500 (Megatron's cut), else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron ``PREFIX.bin/.idx`` pair.

    Indexing gives *sequences* (``ds[i]`` -> 1-D array, the file's dtype, a zero-copy view of the
    memmap); ``document(d)`` gives document ``d`` (its sequences concatenated). Files made by
    ``tools/preprocess_data.py`` or Megatron without sentence splitting hold one sequence per document.

    Args:
        path_prefix: the path without ``.bin``/``.idx``.

    Raises:
        ValueError: naming the file, when either file is missing, the magic/version/dtype code is
            wrong, the ``.idx`` is truncated or carries trailing bytes, the index is inconsistent
            (negative lengths, non-contiguous pointers, document indices not running 0..N), or the
            ``.bin`` size disagrees with the index (truncated, or paired with another index).
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        self.idx_path = idx_path(path_prefix)
        self.bin_path = bin_path(path_prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise ValueError(
                    f"indexed dataset file {path} does not exist; build PREFIX.bin/.idx with "
                    "tools/preprocess_data.py (or Megatron-LM's) and pass the prefix without extension"
                )
        self.dtype, num_sequences, num_document_indices = _read_header(self.idx_path)
        self._read_index(num_sequences, num_document_indices)
        self._map_bin()

    def _read_index(self, num_sequences: int, num_document_indices: int) -> None:
        path = self.idx_path
        expected = HEADER_BYTES + 12 * num_sequences + 8 * num_document_indices
        actual = os.path.getsize(path)
        if actual < expected:
            raise ValueError(
                f"{path} is truncated: its header promises {num_sequences} sequences and "
                f"{num_document_indices} document indices ({expected} bytes) but the file has {actual} "
                "bytes; re-run preprocessing to rebuild the pair"
            )
        if actual not in (expected, expected + num_sequences):  # + N: Megatron's multimodal modes
            raise ValueError(
                f"{path} has {actual - expected} trailing bytes after the index its header describes "
                f"({expected} bytes); the file is corrupt or not a Megatron index: rebuild it"
            )
        if num_document_indices == 0:
            raise ValueError(f"{path} has no document indices (Megatron writes at least [0]); rebuild it")
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
        offset = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buffer, dtype="<i4", count=num_sequences, offset=offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(buffer, dtype="<i8", count=num_sequences, offset=offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(buffer, dtype="<i8", count=num_document_indices, offset=offset)

        if num_sequences and self.sequence_lengths.min() < 0:
            raise ValueError(f"{path} holds negative sequence lengths; the index is corrupt: rebuild it")
        # int64 running sum: lengths are int32 and their count is bounded by the file size.
        token_offsets = np.zeros(num_sequences + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=token_offsets[1:])
        if not np.array_equal(self.sequence_pointers, token_offsets[:-1] * self.dtype.itemsize):
            raise ValueError(
                f"{path}: sequence pointers are not the running byte sum of the sequence lengths, as "
                "Megatron writes them; the index is corrupt or from another writer: rebuild it"
            )
        di = self.document_indices
        if di[0] != 0 or di[-1] != num_sequences or np.any(np.diff(di) < 0):
            raise ValueError(
                f"{path}: document indices must rise from 0 to the sequence count {num_sequences} "
                f"(got first={int(di[0])}, last={int(di[-1])}); the index is corrupt: rebuild it"
            )
        self._token_offsets = token_offsets  # [N + 1] token offset of each sequence in .bin
        self.num_tokens = int(token_offsets[-1])

    def _map_bin(self) -> None:
        expected = self.num_tokens * self.dtype.itemsize
        actual = os.path.getsize(self.bin_path)
        if actual != expected:
            problem = "is truncated" if actual < expected else "is longer than its index describes"
            raise ValueError(
                f"{self.bin_path} {problem}: {self.idx_path} indexes {self.num_tokens} tokens of "
                f"{self.dtype.name} ({expected} bytes) but the file has {actual} bytes; the pair is "
                "mismatched or was cut short: rebuild both from the same preprocessing run"
            )
        if self.num_tokens == 0:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        """Sequence ``index`` as a [length] array of the file's dtype (a view of the memmap)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.bin_path}")
        index %= len(self)
        return self.tokens[self._token_offsets[index] : self._token_offsets[index + 1]]

    def document_token_ranges(self) -> np.ndarray:
        """[num_documents, 2] int64: each document's [start, stop) token offsets into ``tokens``."""
        starts = self._token_offsets[self.document_indices[:-1]]
        stops = self._token_offsets[self.document_indices[1:]]
        return np.stack([starts, stops], axis=1)

    def document(self, index: int) -> np.ndarray:
        """Document ``index`` (its sequences back to back) as a [length] array of the file's dtype."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range for {self.num_documents} in {self.bin_path}")
        start = self._token_offsets[self.document_indices[index]]
        stop = self._token_offsets[self.document_indices[index + 1]]
        return self.tokens[start:stop]

    def token_id_range(self, *, chunk_tokens: int = 1 << 24) -> tuple[int, int]:
        """(min, max) token id over the whole ``.bin``, scanned in chunks of ``chunk_tokens``.

        Raises:
            ValueError: when the dataset holds no tokens.
        """
        if self.num_tokens == 0:
            raise ValueError(f"{self.bin_path} holds no tokens")
        lo, hi = None, None
        for start in range(0, self.num_tokens, chunk_tokens):
            chunk = self.tokens[start : start + chunk_tokens]
            c_lo, c_hi = chunk.min().item(), chunk.max().item()
            lo = c_lo if lo is None else min(lo, c_lo)
            hi = c_hi if hi is None else max(hi, c_hi)
        assert lo is not None and hi is not None  # num_tokens > 0, so the loop ran
        return int(lo), int(hi)


def _read_header(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document-index count) from the first 34 bytes of an ``.idx``."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < len(INDEX_MAGIC) or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise ValueError(
            f"{path} does not start with Megatron's index magic {INDEX_MAGIC!r} (got "
            f"{header[:len(INDEX_MAGIC)]!r}); it is not a Megatron .idx file: pass the prefix of a "
            "PREFIX.bin/.idx pair made by tools/preprocess_data.py"
        )
    if len(header) < HEADER_BYTES:
        raise ValueError(
            f"{path} is truncated: {len(header)} bytes, shorter than the {HEADER_BYTES}-byte header; "
            "rebuild it"
        )
    (version,) = struct.unpack_from("<Q", header, 9)
    if version != INDEX_VERSION:
        raise ValueError(
            f"{path} has index version {version}; only version {INDEX_VERSION} (Megatron-LM's) is "
            "supported: rebuild it with tools/preprocess_data.py"
        )
    code = header[17]
    if code not in DTYPE_CODES:
        raise ValueError(
            f"{path} has dtype code {code}; supported codes are "
            f"{ {c: d.name for c, d in DTYPE_CODES.items()} }: the file is corrupt, rebuild it"
        )
    num_sequences, num_document_indices = struct.unpack_from("<QQ", header, 18)
    return DTYPE_CODES[code], num_sequences, num_document_indices


class IndexedDatasetWriter:
    """Writes a Megatron ``PREFIX.bin/.idx`` pair atomically, one sequence per document.

    Use as a context manager: documents go to temporary files beside the targets, and only a clean
    exit renames them into place (``.bin`` first, then ``.idx``); an exception removes them, so a
    crash never leaves a half-written pair under the final names.

    Args:
        path_prefix: the output path without extension; its directory is created.
        dtype: token dtype; must be one of Megatron's (``DTYPE_CODES``). Use ``optimal_dtype(vocab)``.

    Raises:
        ValueError: on an unsupported dtype, or a document whose ids do not fit the dtype.
    """

    def __init__(self, path_prefix: str, *, dtype: np.dtype):
        dtype = np.dtype(dtype)
        if dtype not in _CODE_OF_DTYPE:
            raise ValueError(
                f"dtype {dtype} is not one of Megatron's token dtypes "
                f"{[d.name for d in DTYPE_CODES.values()]}; use optimal_dtype(vocab_size)"
            )
        self.path_prefix = path_prefix
        self.dtype = dtype
        self._sequence_lengths: list[int] = []
        self._bin_tmp = f"{bin_path(path_prefix)}.tmp{os.getpid()}"
        self._idx_tmp = f"{idx_path(path_prefix)}.tmp{os.getpid()}"
        self._bin_file: Optional[BinaryIO] = None

    def __enter__(self) -> IndexedDatasetWriter:
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        self._bin_file = open(self._bin_tmp, "wb")
        return self

    def add_document(self, token_ids: Iterable[int] | np.ndarray) -> None:
        """Append one document (a 1-D sequence of token ids) as one sequence."""
        assert self._bin_file is not None, "use IndexedDatasetWriter as a context manager"
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"a document must be 1-D token ids, got shape {ids.shape}")
        if ids.size and np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            lo, hi = ids.min(), ids.max()
            if lo < info.min or hi > info.max:
                raise ValueError(
                    f"token ids in [{lo}, {hi}] do not fit {self.dtype.name} for {self.path_prefix}; "
                    "pick the dtype with optimal_dtype(vocab_size) of the tokenizer that made them"
                )
        self._bin_file.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
        self._sequence_lengths.append(int(ids.size))

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._bin_file is not None, "use IndexedDatasetWriter as a context manager"
        self._bin_file.close()
        if exc_type is not None:
            for path in (self._bin_tmp, self._idx_tmp):
                if os.path.exists(path):
                    os.remove(path)
            return
        self._write_index()
        os.replace(self._bin_tmp, bin_path(self.path_prefix))
        os.replace(self._idx_tmp, idx_path(self.path_prefix))

    def _write_index(self) -> None:
        lengths = np.asarray(self._sequence_lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        if len(lengths):
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        document_indices = np.arange(len(lengths) + 1, dtype="<i8")  # one sequence per document
        with open(self._idx_tmp, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", _CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(document_indices.tobytes(order="C"))


def write_indexed_dataset(
    path_prefix: str, documents: Iterable[Iterable[int]], *, dtype: Optional[np.dtype] = None,
    vocab_size: int = 0,
) -> None:
    """Write ``documents`` (token-id sequences) as ``PREFIX.bin/.idx``, atomically.

    Give ``dtype``, or ``vocab_size`` to pick ``optimal_dtype(vocab_size)``.

    Raises:
        ValueError: when neither or both of ``dtype`` and ``vocab_size`` are given, or as
            ``IndexedDatasetWriter``.
    """
    if (dtype is None) == (vocab_size <= 0):
        raise ValueError("write_indexed_dataset needs exactly one of dtype= or vocab_size=")
    with IndexedDatasetWriter(path_prefix, dtype=dtype if dtype is not None else optimal_dtype(vocab_size)) as w:
        for document in documents:
            w.add_document(np.asarray(document))
