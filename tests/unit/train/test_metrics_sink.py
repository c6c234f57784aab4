import json

from longcat.config.schema import LoggingConfig, WandbConfig
from longcat.train.metrics import MetricsSink, drop_records_after


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _sink(tmp_path, start_step):
    cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="disabled"))
    return MetricsSink(cfg, out_dir=tmp_path, total_steps=10, start_step=start_step, enabled=True)


def test_resumed_run_logs_each_step_once(tmp_path):
    sink = _sink(tmp_path, 0)
    for step in range(1, 6):  # the interrupted run got to step 5; its last checkpoint is step 3
        sink.log(step, {"loss": float(step)})
    sink.close()
    resumed = _sink(tmp_path, 3)
    for step in range(4, 8):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    path = tmp_path / "metrics.jsonl"
    assert _steps(path) == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads(path.read_text().splitlines()[4])["loss"] == 15.0  # step 5 from the resumed run


def test_drop_records_after_removes_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert drop_records_after(path, 5) == 1
    assert _steps(path) == [1, 2]
    assert drop_records_after(path, 5) == 0 and drop_records_after(tmp_path / "none.jsonl", 0) == 0


def test_a_fresh_start_replaces_a_killed_runs_records(tmp_path):
    killed = _sink(tmp_path, 0)
    for step in (0, 1, 2):  # killed before its first checkpoint
        killed.log(step, {"loss": 1.0})
    killed.close()
    again = _sink(tmp_path, 0)
    again.log(0, {"val/loss": 9.0})
    again.log(1, {"loss": 2.0})
    again.close()
    assert _steps(tmp_path / "metrics.jsonl") == [0, 1]
