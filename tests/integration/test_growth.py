"""Model growth (arXiv 2509.01322 §3.1.2): a grown checkpoint holds the source layers in order, twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.scaling.growth import grow_checkpoint, source_name
from longcat.train.trainer import Trainer


def _trainer(cache, out, **extra):
    cfg, d = compose_run_config("pretrain", tiny_overrides(cache, str(out), **extra))
    return Trainer(cfg, config_dict=d)


def test_grown_model_stacks_source_layers_and_keeps_training_state(corpus_cache, tmp_path):
    src = _trainer(corpus_cache, tmp_path / "half")
    for _ in range(2):
        src.train_step()
    src.save_checkpoint()
    grown_path = grow_checkpoint(tmp_path / "half", tmp_path / "full" / "checkpoints", factor=2)
    assert grown_path.name == "step_00000002"

    grown = _trainer(corpus_cache, tmp_path / "full", **{"model.num_layers": 4})
    assert grown.step == 2
    assert grown.data.train.state_dict() == src.data.train.state_dict()
    assert grown.scheduler.last_epoch == src.scheduler.last_epoch
    src_sd, tgt_sd = src.model.state_dict(), grown.model.state_dict()
    assert len(tgt_sd) > len(src_sd)
    for name, tensor in tgt_sd.items():
        assert torch.equal(tensor, src_sd[source_name(name, source_layers=2)]), name
    # layer 2 is a copy of layer 0 and layer 3 of layer 1, not of each other
    assert not torch.equal(tgt_sd["model.layers.2.mlps.0.up_proj.weight"],
                           tgt_sd["model.layers.3.mlps.0.up_proj.weight"])
    moments = {id(p): s for p, s in grown.optimizer.state.items()}
    assert moments, "optimizer moments were not carried over"
    result = grown.train_step()
    assert torch.isfinite(torch.tensor(result.loss.total))


def test_grow_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="factor"):
        grow_checkpoint(tmp_path, tmp_path / "x", factor=1)
    with pytest.raises(ValueError, match="no complete longcat checkpoint"):
        grow_checkpoint(tmp_path, tmp_path / "x", factor=2)


def test_grow_tool_help():
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "tools/grow_model.py", "--help"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and "--factor" in out.stdout
