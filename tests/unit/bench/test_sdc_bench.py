from conftest import tiny_overrides

from longcat.bench.sdc import CANDIDATE_INTERVALS, SDCBenchSettings, run


def test_quick_sdc_benchmark_reports_every_interval(corpus_cache, tmp_path):
    overrides = tuple(o for o in tiny_overrides(corpus_cache, str(tmp_path))
                      if not o.startswith(("train.", "logging.")))
    result = run(settings=SDCBenchSettings(overrides=overrides, rounds=1, steps_per_block=1, interval_blocks=1,
                                           checksum_repeats=1))
    m = result.metrics
    # the timed replay steps really ran a replay check each, and none of them raised a false alarm
    assert m["replay_checks_run"] >= 1 and m["false_alarms"] == 0
    assert m["step_s"] > 0 and m["replay_step_s"] > 0 and m["checksum_grads_ms"] > 0
    assert m["smallest_interval_within_5pct"] in CANDIDATE_INTERVALS
    assert result.name == "sdc" and result.tables
