import pytest

from longcat.bench.profile import ProfileSettings, op_group, run, summarise


def test_op_groups():
    assert op_group("aten::mm") == op_group("aten::bmm") == op_group("aten::addmm_") == "matmul"
    assert op_group("aten::fill_") == op_group("aten::index_select") == "memory"
    assert op_group("aten::silu_backward") == "other"


def test_summarise_partitions_the_time():
    per_op = {"aten::mm": [3.0, 10], "aten::fill_": [1.0, 4], "aten::mul": [2.0, 6]}
    s = summarise(per_op, rounds=2)
    assert s["op_s"] == pytest.approx(3.0)
    assert (s["matmul_s"], s["memory_s"], s["other_s"]) == pytest.approx((1.5, 0.5, 1.0))
    assert s["matmul_share"] + s["memory_share"] + s["other_share"] == pytest.approx(1.0)
    assert s["matmul_calls"] == 5


def test_quick_profile_bench_profiles_both_and_finds_the_matmuls():
    result = run(settings=ProfileSettings(preset="tiny", batch_size=1, seq_len=16, rounds=1, top=5))
    m = result.metrics
    for impl in ("ours", "reference"):
        assert m[f"{impl}_op_s"] > 0 and m[f"{impl}_matmul_calls"] > 0
        assert m[f"{impl}_matmul_share"] + m[f"{impl}_memory_share"] + m[f"{impl}_other_share"] == pytest.approx(1.0)
    assert m["op_time_ratio"] > 0
    assert [t.title for t in result.tables[1:]] == ["Hottest operators: ours", "Hottest operators: reference"]
    assert len(result.tables[1].rows) == 5
