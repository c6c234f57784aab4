import pytest

from conftest import tiny_overrides
from longcat.bench.sdc import CANDIDATE_INTERVALS, SDCBenchSettings, run


def test_quick_sdc_benchmark_reports_every_interval(corpus_cache, tmp_path):
    overrides = tuple(o for o in tiny_overrides(corpus_cache, str(tmp_path))
                      if not o.startswith(("train.", "logging.")))
    result = run(settings=SDCBenchSettings(overrides=overrides, rounds=1, steps_per_block=1, interval_blocks=1,
                                           checksum_repeats=1))
    m = result.metrics
    for key in ("overhead_interval_1", "overhead_interval_10", "overhead_interval_100", "checksum_grads_ms"):
        assert m[key] >= 0, key
    assert m["overhead_interval_1"] == pytest.approx(10 * m["overhead_interval_10"])
    assert m["overhead_interval_1"] == pytest.approx(100 * m["overhead_interval_100"])
    assert m["smallest_interval_within_5pct"] in CANDIDATE_INTERVALS and m["false_alarms"] == 0
    assert result.name == "sdc" and result.tables
