"""longcat.bench.dispatchers: the summary of the ranks' measurements (the measuring runs in ``make bench``)."""

from __future__ import annotations

import pytest

from longcat.bench.dispatchers import DispatcherBenchSettings, summarise

MIB = 2**20


def _rank(step_s: dict[str, float], mib: dict[str, float]) -> dict:
    return {f"{k}.{name}": {"step_s": [step_s[name], step_s[name] * 3, step_s[name]],
                            "peer_bytes_per_step": mib[name] * MIB, "rows_per_step": 10.0, "zero_expert_rows_sent": 0}
            for k in (4, 8) for name in ("alltoall", "allgather")}


def test_summary_takes_the_slowest_rank_and_mean_bytes():
    settings = DispatcherBenchSettings(topks="4,8", ep_sizes="2")
    ranks = [_rank({"alltoall": 0.1, "allgather": 0.2}, {"alltoall": 4.0, "allgather": 1.0}),
             _rank({"alltoall": 0.3, "allgather": 0.1}, {"alltoall": 2.0, "allgather": 1.0})]
    result = summarise({2: ranks}, settings)
    m = result.metrics
    assert m["ep2.topk4.alltoall.step_s"] == pytest.approx(0.3)  # slower rank's median
    assert m["ep2.topk4.allgather.step_s"] == pytest.approx(0.2)
    assert m["ep2.topk4.alltoall.step_min_s"] == pytest.approx(0.3)  # slower rank's fastest round
    assert m["ep2.topk8.alltoall.peer_mib_per_step"] == pytest.approx(3.0)
    assert m["ep2.topk8.allgather_over_alltoall_bytes"] == pytest.approx(1.0 / 3.0)
    assert m["ep2.topk4.allgather.zero_expert_rows_sent"] == 0
    assert [row[:2] for row in result.tables[0].rows] == [[2, 4], [2, 8]]
    assert result.name == "dispatchers" and "600.0 Mbit/s" in result.notes[0]
