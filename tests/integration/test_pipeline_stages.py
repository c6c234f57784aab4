"""The stage pipeline (pre-train -> mid-train -> long context -> SFT) and model growth, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from longcat.stages import PIPELINES, run_pipeline


def _overrides(cache, **extra):
    base = tiny_overrides(cache, "unused", **{"train.steps": 2, "train.eval_interval": 2, "train.checkpoint_interval": 2,
                                              "optim.warmup_steps": 1, "data.seq_length": 512, **extra})
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
    assert set(PIPELINES) >= {"pipeline", "pretrain_growth"}
