"""The metrics reader and tools/plot_metrics.py on small synthetic metrics files."""

import json
import logging
import os
import subprocess
import sys

import pytest

from longcat.plots import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_metrics.py")


def write_metrics(path, num_steps=5, tail=""):
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "moe/layer0/ffn_experts_per_token": 2.0,
                "moe/layer0/expert_load": [0.5, 1.5]} for s in range(1, num_steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_read_metrics_skips_only_a_torn_last_line(tmp_path, caplog):
    torn = write_metrics(tmp_path / "torn.jsonl", tail='{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="longcat.plots"):
        assert [r["step"] for r in read_metrics(torn)] == [1, 2, 3, 4, 5]
    assert f"{torn}:6: skipped the torn last line" in caplog.text
    middle = tmp_path / "middle.jsonl"
    middle.write_text(torn.read_text() + "\n" + json.dumps({"step": 7}) + "\n")
    with pytest.raises(ValueError, match=f"{middle}:6: not a JSON record"):
        read_metrics(middle)
    for line in ("[1, 2, 3]", "7", '"step"'):
        listed = write_metrics(tmp_path / "listed.jsonl", tail=line + "\n")
        with pytest.raises(ValueError, match=f"{listed}:6: not a metrics record: JSON .*, expected an object"):
            read_metrics(listed)
    stepless = write_metrics(tmp_path / "stepless.jsonl", tail='{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=f"{stepless}:6: a metrics record needs an integer"):
        read_metrics(stepless)
    only_torn = tmp_path / "only.jsonl"
    only_torn.write_text('{"step": 1, "lo')
    with pytest.raises(ValueError, match="holds no metrics records"):
        read_metrics(only_torn)


def test_plot_metrics_plots_a_torn_file_with_a_warning(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl", tail='{"step": 6, "lo')
    result = run_tool("--metrics", metrics, "--target-ffn-experts", "2")
    assert result.returncode == 0, result.stderr
    assert "metrics.jsonl:6: skipped the torn last line" in result.stderr
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000


def test_plot_metrics_reports_bad_inputs_and_outputs(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "file").write_text("")
    listed = write_metrics(tmp_path / "listed.jsonl", tail="[1, 2, 3]\n" + json.dumps({"step": 7}) + "\n")
    cases = [
        (["--metrics", tmp_path], f"{tmp_path} is a directory; pass the metrics file, e.g. --metrics "
         f"{tmp_path / 'metrics.jsonl'}"),
        (["--metrics", listed], f"{listed}:6: not a metrics record: JSON list"),
        (["--metrics", metrics, "--output", tmp_path / "file" / "plots"], "error: cannot write the plots to"),
        (["--metrics", metrics, "--target-ffn-experts", "-1"], "--target-ffn-experts: must be a positive number"),
        (["--metrics", metrics, "--target-ffn-experts", "0"], "--target-ffn-experts: must be a positive number"),
    ]
    for args, problem in cases:
        result = run_tool(*args)
        assert result.returncode == 2 and problem in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
