"""The suite runs every benchmark in a process of its own and keeps going past a failure."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.bench.run_one import main
from longcat.bench.suite import Benchmark, run_suite


def test_a_failing_benchmark_is_reported_and_the_rest_still_run_each_in_its_own_process(tmp_path):
    """The broken one's own module is what its child runs (not a registered benchmark); the next one still
    runs, with the thread count passed down, and reaches the callback with its tables."""
    broken = Benchmark("broken", "fails in its child: its module does not exist", "longcat.bench.no_such_module")
    seen = []
    with pytest.raises(RuntimeError, match=r"\['broken'\]"):
        run_suite([broken, Benchmark("profile", "profile", "longcat.bench.profile")], quick=True, output_dir=tmp_path,
                  docs_path=None, threads=1, on_result=lambda result, path: seen.append((result, path)))
    (result, path), = seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]
    assert path == tmp_path / "profile.json" and result.tables and result.tables[0].rows
    assert result.machine["torch_threads"] == 1


def test_child_entry_point_writes_the_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "Run one benchmark" in capsys.readouterr().out
    assert main(["profile", "--quick", "--output", str(tmp_path)]) == 0  # in this process: threads untouched
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["mode"] == "quick" and data["machine"]["torch_threads"] == torch.get_num_threads()
    assert data["metrics"]["ours_matmul_calls"] > 0
