"""Megatron .bin/.idx compatibility and every way a pair can be broken."""

import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    optimal_dtype,
    write_indexed_dataset,
)

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12]]


def megatron_idx_bytes(lengths, document_indices, *, code=8, itemsize=2, version=1, magic=b"MMIDIDX\x00\x00"):
    """An .idx built by hand from the layout in Megatron-LM's _IndexWriter."""
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * itemsize
    return (
        magic + struct.pack("<Q", version) + struct.pack("<B", code)
        + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices))
        + np.asarray(lengths, dtype="<i4").tobytes() + pointers.astype("<i8").tobytes()
        + np.asarray(document_indices, dtype="<i8").tobytes()
    )


def write_pair(prefix, idx_bytes, tokens, dtype="<u2"):
    with open(prefix + ".idx", "wb") as f:
        f.write(idx_bytes)
    with open(prefix + ".bin", "wb") as f:
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def test_writer_bytes_match_hand_built_megatron_index(tmp_path):
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, DOCS, vocab_size=100)
    with open(prefix + ".idx", "rb") as f:
        written = f.read()
    assert written == megatron_idx_bytes([3, 1, 4], [0, 1, 2, 3])
    header = b"MMIDIDX\x00\x00" + b"\x01" + b"\x00" * 7 + b"\x08" + b"\x03" + b"\x00" * 7 + b"\x04" + b"\x00" * 7
    assert written[:34] == header  # magic, version 1, uint16 code 8, 3 sequences, 4 document indices
    assert written[34:46] == bytes([3, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0])  # int32 lengths
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == np.array(sum(DOCS, []), dtype="<u2").tobytes()


@pytest.mark.parametrize("vocab_size,dtype",
                         [(100, np.uint16), (65499, np.uint16), (65500, np.int32), (200000, np.int32)])
def test_roundtrip_and_smallest_dtype(tmp_path, vocab_size, dtype):
    assert optimal_dtype(vocab_size) == np.dtype(dtype)
    docs = [[vocab_size - 1, 0, 3], [], [1, 2]]
    prefix = str(tmp_path / "d")
    write_indexed_dataset(prefix, docs, vocab_size=vocab_size)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == 3 and ds.num_documents == 3 and ds.num_tokens == 5
    assert [ds[i].tolist() for i in range(3)] == docs
    assert [ds.document(i).tolist() for i in range(3)] == docs
    assert ds.token_id_range() == (0, vocab_size - 1)


def test_reads_hand_built_pair_with_multi_sequence_documents(tmp_path):
    """Megatron's sentence-split layout: document 0 holds sequences 0 and 1."""
    prefix = str(tmp_path / "m")
    write_pair(prefix, megatron_idx_bytes([2, 1, 3], [0, 2, 3], code=4, itemsize=4), [1, 2, 3, 4, 5, 6], "<i4")
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2
    assert ds.document(0).tolist() == [1, 2, 3] and ds.document(1).tolist() == [4, 5, 6]
    assert ds.document_token_ranges().tolist() == [[0, 3], [3, 6]]


def test_every_megatron_dtype_code_reads(tmp_path):
    for code, dtype in DTYPE_CODES.items():
        prefix = str(tmp_path / f"c{code}")
        write_pair(prefix, megatron_idx_bytes([2], [0, 1], code=code, itemsize=dtype.itemsize), [3, 4], dtype)
        assert IndexedDataset(prefix)[0].tolist() == [3, 4]


def test_multimodal_modes_are_accepted(tmp_path):
    prefix = str(tmp_path / "mm")
    write_pair(prefix, megatron_idx_bytes([2, 1], [0, 1, 2]) + b"\x00\x01", [1, 2, 3])
    assert IndexedDataset(prefix).document(1).tolist() == [3]


def test_writer_is_atomic_on_error(tmp_path):
    prefix = str(tmp_path / "a")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
            w.add_document([1, 2])
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_indexed_dataset(str(tmp_path / "x"), [[70000]], dtype=np.uint16)
    with pytest.raises(ValueError, match="not one of Megatron"):
        IndexedDatasetWriter(str(tmp_path / "x"), dtype=np.uint32)


@pytest.fixture
def good_pair(tmp_path):
    prefix = str(tmp_path / "g")
    write_indexed_dataset(prefix, DOCS, vocab_size=100)
    with open(prefix + ".idx", "rb") as f:
        return prefix, bytearray(f.read())


def rewrite(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_missing_files(tmp_path, good_pair):
    prefix, _ = good_pair
    with pytest.raises(ValueError, match="nope.idx does not exist"):
        IndexedDataset(str(tmp_path / "nope"))
    os.remove(prefix + ".bin")
    with pytest.raises(ValueError, match=r"g\.bin does not exist"):
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b.__setitem__(slice(0, 4), b"XXXX"), "magic"),
        (lambda b: b.__setitem__(slice(9, 17), struct.pack("<Q", 2)), "index version 2"),
        (lambda b: b.__setitem__(17, 9), "dtype code 9"),
        (lambda b: b.__setitem__(17, 0), "dtype code 0"),
        (lambda b: b.__delitem__(slice(-3, None)), "truncated"),
        (lambda b: b.__delitem__(slice(20, None)), "truncated"),
        (lambda b: b.__delitem__(slice(5, None)), "magic"),
        (lambda b: b.extend(b"\x00" * 5), "trailing bytes"),
        (lambda b: b.__setitem__(slice(34, 38), struct.pack("<i", -1)), "negative sequence lengths|pointers"),
        (lambda b: b.__setitem__(slice(34 + 12, 34 + 20), struct.pack("<q", 4)), "pointers"),
        (lambda b: b.__setitem__(slice(-8, None), struct.pack("<q", 2)), "document indices"),
        (lambda b: b.__setitem__(slice(-32, -24), struct.pack("<q", 1)), "document indices"),
    ],
)
def test_corrupt_index_names_the_file(good_pair, mutate, message):
    prefix, data = good_pair
    mutate(data)
    rewrite(prefix + ".idx", data)
    with pytest.raises(ValueError, match=message) as info:
        IndexedDataset(prefix)
    assert "g.idx" in str(info.value)


def test_truncated_and_overlong_bin(good_pair):
    prefix, _ = good_pair
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    rewrite(prefix + ".bin", data[:-2])
    with pytest.raises(ValueError, match=r"g\.bin is truncated"):
        IndexedDataset(prefix)
    rewrite(prefix + ".bin", data + b"\x00\x00")
    with pytest.raises(ValueError, match=r"g\.bin is longer than its index"):
        IndexedDataset(prefix)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: megatron_idx_bytes([3, 1, 4], [0, 1, 2, 3])[:34] + b),
        st.tuples(st.integers(0, 109), st.integers(0, 255)).map(
            lambda p: bytes(
                (v if i != p[0] else p[1]) for i, v in enumerate(megatron_idx_bytes([3, 1, 4], [0, 1, 2, 3]))
            )
        ),
        st.integers(0, 109).map(lambda n: megatron_idx_bytes([3, 1, 4], [0, 1, 2, 3])[:n]),
    ),
    num_bin_bytes=st.sampled_from([0, 1, 14, 16, 64]),
)
def test_fuzzed_index_raises_only_value_error(data, num_bin_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "f")
        rewrite(prefix + ".idx", data)
        rewrite(prefix + ".bin", bytes(range(num_bin_bytes)))
        try:
            ds = IndexedDataset(prefix)
        except ValueError:
            return
        for d in range(ds.num_documents):  # a pair that loads must be readable end to end
            assert len(ds.document(d)) >= 0
        del ds
