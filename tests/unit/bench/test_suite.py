"""The suite runs every benchmark in a process of its own and keeps going past a failure."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.bench.suite import Benchmark, main, run_suite


def test_a_failing_benchmark_is_reported_and_the_rest_still_run(tmp_path):
    broken = Benchmark("no_such_benchmark", "fails in its child: not a suite name", "longcat.bench.nothing")
    seen = []
    with pytest.raises(RuntimeError, match="no_such_benchmark"):
        run_suite([broken], quick=True, output_dir=tmp_path, docs_path=None,
                  on_result=lambda result, path: seen.append(result.name))
    assert seen == [] and not list(tmp_path.iterdir())


def test_child_entry_point_writes_the_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "Run one benchmark" in capsys.readouterr().out
    assert main(["profile", "--quick", "--output", str(tmp_path)]) == 0  # in this process: threads untouched
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["mode"] == "quick" and data["machine"]["torch_threads"] == torch.get_num_threads()
    assert data["metrics"]["ours_matmul_calls"] > 0
