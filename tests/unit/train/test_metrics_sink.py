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


def test_console_line_every_logged_step_without_a_tty(tmp_path, capsys):
    sink = _sink(tmp_path, 0)  # progress_bar off: the lines are all a cluster log would show
    sink.log(0, {"val/loss": 9.0})
    sink.log(1, {"loss": 6.25, "lr": 3e-3, "grad_norm": 1.5, "tokens_per_s": 1234.4, "nonfinite/skipped_steps": 0,
                 "moe/ffn_experts_per_token": 2.5, "moe/layer0/expert_load": [0.5, 0.5]})
    sink.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [" step 1/10 | loss 6.2500 | lr 3.000e-03 | grad norm 1.500 | tokens/s 1234 | skipped 0 | "
                     "FFN experts/token 2.50"]


def test_per_expert_load_keeps_expert_identity():
    from longcat.train.metrics import PER_EXPERT_SCALARS_MAX, scalar_metrics

    record = {"step": 3, "loss": 1.0, "moe/layer1/expert_load": [0.1, 0.7, 0.2], "note": "x",
              "moe/layer0/expert_load": [0.0] * (PER_EXPERT_SCALARS_MAX + 1)}
    scalars = scalar_metrics(record)
    assert scalars == {"loss": 1.0, "moe/layer1/expert_0": 0.1, "moe/layer1/expert_1": 0.7,
                       "moe/layer1/expert_2": 0.2}


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="disabled"), tensorboard=True)
    sink = MetricsSink(cfg, out_dir=tmp_path, total_steps=10, start_step=0, enabled=True)
    for step in (1, 2):
        sink.log(step, {"loss": float(step), "moe/layer0/expert_load": [0.25, 0.75]})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == [1.0, 2.0]
    assert [e.value for e in events.Scalars("moe/layer0/expert_1")] == [0.75, 0.75]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="offline"))
    first = MetricsSink(cfg, out_dir=tmp_path, total_steps=10, start_step=0, enabled=True)
    first.log(1, {"loss": 1.0})
    run_id = first._wandb.id
    first.close()
    resumed = MetricsSink(cfg, out_dir=tmp_path, total_steps=10, start_step=3, enabled=True)
    assert resumed._wandb.id == run_id and (tmp_path / "wandb_run_id").read_text().strip() == run_id
    resumed.close()
    fresh = MetricsSink(cfg, out_dir=tmp_path, total_steps=10, start_step=0, enabled=True)
    assert fresh._wandb.id != run_id  # a fresh start (step 0) is a new run
    fresh.close()
