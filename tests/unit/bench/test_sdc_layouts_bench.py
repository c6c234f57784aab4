from conftest import tiny_overrides

from longcat.bench.sdc_layouts import INTERVALS, LAYOUTS, SDCLayoutBenchSettings, run


def test_quick_sdc_layouts_benchmark_reports_both_layouts(corpus_cache, tmp_path):
    overrides = tuple(o for o in tiny_overrides(corpus_cache, str(tmp_path), **{"data.global_batch_size": 8})
                      if not o.startswith(("train.", "logging.")))
    result = run(settings=SDCLayoutBenchSettings(overrides=overrides, rounds=1, steps_per_block=1))
    m = result.metrics
    for layout in LAYOUTS:
        key = layout.replace("-", "_")
        assert m[f"{key}_replay_checks_run"] >= 1 and m[f"{key}_false_alarms"] == 0  # replays ran, clean
        assert m[f"{key}_step_cpu_s"] > 0 and m[f"{key}_replay_step_cpu_s"] > 0
        assert all(f"{key}_overhead_cpu_interval_{n}" in m for n in INTERVALS)
    assert result.name == "sdc_layouts" and len(result.tables[0].rows) == len(LAYOUTS) * len(INTERVALS)
