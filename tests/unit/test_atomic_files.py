import argparse

import pytest

from longcat.atomic_files import atomic_open, atomic_path, write_text_atomic
from longcat.tool_args import positive_float, positive_int


def test_write_replaces_and_creates_the_directory(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "m.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half a lin")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_a_directory_target_fails_cleanly(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "d", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_atomic_path_hands_out_a_path_beside_the_target(tmp_path):
    with atomic_path(tmp_path / "t.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("t.bin.tmp")
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "t.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("parse,good,bad", [
    (positive_int, [("1", 1), ("70", 70)], ["0", "-3", "abc", "1.5"]),
    (positive_float, [("3", 3.0), ("0.5", 0.5)], ["0", "-1", "inf", "nan", "x"]),
])
def test_tool_arg_types(parse, good, bad):
    for text, value in good:
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be a positive"):
            parse(text)
