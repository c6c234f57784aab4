"""The stage pipeline (pre-train -> mid-train -> long context -> SFT) and model growth, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.stages import (
    available_pipelines,
    load_pipeline,
    plan_pipeline,
    run_pipeline,
    validate_pipeline,
)


def load_pipeline_text(name):
    return (Path(__file__).resolve().parents[2] / "recipes" / "pipelines" / f"{name}.yaml").read_text()


def _overrides(cache, **extra):
    base = tiny_overrides(cache, "unused", **{"train.steps": 2, "train.eval_interval": 2,
                                              "train.checkpoint_interval": 2, "optim.warmup_steps": 1,
                                              "data.seq_length": 512, **extra})
    return [o for o in base if not o.startswith("train.out_dir")]


def test_pipeline_chains_stages_through_checkpoints(corpus_cache, tmp_path):
    results = run_pipeline("pipeline", out_root=tmp_path, overrides=_overrides(corpus_cache))
    assert [r.name for r in results] == ["pretrain", "midtrain", "long_context", "sft"]
    for r in results:
        assert r.final_checkpoint and r.final_val_loss is not None, r
    # each later stage starts from the previous stage's weights: its config records init_from
    for prev, stage in zip(results, results[1:]):
        cfg = json.loads((tmp_path / stage.name / "config.json").read_text())
        assert cfg["train"]["init_from"] == prev.final_checkpoint
    long_cfg = json.loads((tmp_path / "long_context" / "config.json").read_text())
    assert long_cfg["model"]["rope_theta"] == 50000.0


def test_unknown_pipeline_or_stage_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="pipeline"):
        run_pipeline("nope", out_root=tmp_path)
    with pytest.raises(ValueError, match="stage"):
        run_pipeline("pipeline", out_root=tmp_path, stages=["warmup"])
    assert set(available_pipelines()) >= {"pipeline", "pretrain_growth"}


@pytest.mark.parametrize("name", available_pipelines())
def test_every_pipeline_recipe_composes_and_validates_each_stage(name):
    stages = load_pipeline(name)
    configs = validate_pipeline(name)
    assert len(configs) == len(stages) >= 2
    assert not stages[0].init_from_previous and stages[0].grow_factor == 0


def test_pipeline_stage_order_and_settings():
    assert [s.recipe for s in load_pipeline("pipeline")] == ["pretrain", "midtrain", "long_context", "sft"]
    half, grown = validate_pipeline("pretrain_growth")
    assert grown.model.num_layers == 2 * half.model.num_layers
    assert load_pipeline("pretrain_growth")[1].grow_factor == 2
    assert half.train.steps < grown.train.steps  # the grown model continues the same schedule


def test_bad_stage_configuration_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="stage 'pretrain'.*optim.lr"):
        run_pipeline("pipeline", out_root=tmp_path, overrides=["optim.lr=-1"])
    assert not any(tmp_path.iterdir())


def test_run_pipeline_tool_dry_run_and_help(tmp_path):
    tool = Path(__file__).resolve().parents[2] / "tools" / "run_pipeline.py"
    out = subprocess.run([sys.executable, str(tool), "--pipeline", "pretrain_growth", "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "half_depth: longcat-train recipe=pretrain" in out.stdout and "grow_model.py --factor 2" in out.stdout
    assert not any(tmp_path.iterdir())
    bad = subprocess.run([sys.executable, str(tool), "--dry-run", "optim.lr=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.lr" in bad.stderr
    helped = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "pretrain_growth" in helped.stdout


@pytest.mark.parametrize("override,needle", [
    ("train.out_dir=/tmp/elsewhere", "--out"),          # would send every stage into one folder
    ("train.init_from=/tmp/ckpt", "previous stage"),
])
def test_overrides_the_pipeline_owns_are_refused(tmp_path, override, needle):
    with pytest.raises(ValueError, match=needle):
        run_pipeline("pipeline", out_root=tmp_path, overrides=[override])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override", ["train.steps=10", "model.num_layers=4", "+model.num_layers=4"])
def test_overrides_a_stage_sets_itself_are_refused_not_ignored(tmp_path, override):
    with pytest.raises(ValueError, match="stage 'half_depth'.*itself"):
        plan_pipeline("pretrain_growth", out_root=tmp_path, overrides=[override])


def test_a_growth_stage_must_train_past_the_stage_it_grows(tmp_path):
    copy = tmp_path / "growth.yaml"
    copy.write_text(load_pipeline_text("pretrain_growth").replace("train.steps=300", "train.steps=600"))
    with pytest.raises(ValueError, match="stage 'grown'.*would train nothing"):
        plan_pipeline(str(copy), out_root=tmp_path)
    ok = tmp_path / "growth_ok.yaml"
    ok.write_text(load_pipeline_text("pretrain_growth")
                  .replace("train.steps=300", "train.steps=4, optim.warmup_steps=1")
                  .replace("[model.num_layers=2]", "[model.num_layers=2, train.steps=6, optim.warmup_steps=1]"))
    assert [p.stage.name for p in plan_pipeline(str(ok), out_root=tmp_path)] == ["half_depth", "grown"]
    with pytest.raises(ValueError, match=f"change it in {ok}"):
        plan_pipeline(str(ok), out_root=tmp_path, overrides=["train.steps=8"])


def test_a_stage_whose_skipped_predecessor_has_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stage 'sft'.*long_context.*has none"):
        run_pipeline("pipeline", out_root=tmp_path, stages=["sft"])
    # the first stage needs nothing before it
    assert [p.stage.name for p in plan_pipeline("pipeline", out_root=tmp_path, stages=["pretrain"])] == ["pretrain"]


def test_pretrain_growth_pipeline_grows_and_continues_then_resumes(corpus_cache, tmp_path, capfd):
    recipe = tmp_path / "growth.yaml"
    recipe.write_text(load_pipeline_text("pretrain_growth").replace("train.steps=300", "train.steps=2")
                      .replace("[model.num_layers=2]", "[model.num_layers=2, train.steps=4]"))
    overrides = [o for o in _overrides(corpus_cache, **{"data.seq_length": 64})
                 if not o.startswith(("train.steps", "model.num_layers"))]
    half, grown = run_pipeline(str(recipe), out_root=tmp_path / "runs", overrides=overrides)
    assert half.final_checkpoint.endswith("step_00000002") and grown.final_checkpoint.endswith("step_00000004")
    grown_cfg = json.loads((tmp_path / "runs" / "grown" / "config.json").read_text())
    assert grown_cfg["model"]["num_layers"] == 2 and grown_cfg["train"]["init_from"] in (None, "")
    capfd.readouterr()
    # a rerun resumes each stage from its own checkpoint: nothing is grown or trained again
    again = run_pipeline(str(recipe), out_root=tmp_path / "runs", overrides=overrides)
    assert [r.final_checkpoint for r in again] == [half.final_checkpoint, grown.final_checkpoint]
    assert "resuming from its own checkpoint" in capfd.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs" / "grown" / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004"]


def test_a_stage_stopped_before_its_last_step_stops_the_pipeline(tmp_path):
    """A preempted stage exits 0 with a checkpoint short of train.steps: the next stage must not start."""
    from longcat.train.checkpoint import TRAINER_STATE

    early = tmp_path / "runs" / "pretrain" / "checkpoints" / "step_00000007"
    early.mkdir(parents=True)
    (early / TRAINER_STATE).write_bytes(b"")
    (early / ".metadata").write_bytes(b"")
    stopped = tmp_path / "stopped_early"  # stands in for a training process that was preempted
    stopped.write_text("#!/bin/sh\nexit 0\n")
    stopped.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"stage 'pretrain' ended without its final checkpoint \(step 500\)"):
        run_pipeline("pipeline", out_root=tmp_path / "runs", python=str(stopped))
    assert not (tmp_path / "runs" / "midtrain").exists()
