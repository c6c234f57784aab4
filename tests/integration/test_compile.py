"""``train.compile`` in one process: the dense blocks really compile, train as the eager model does,
replay bit for bit under the SDC check, and bad combinations are refused before work.

The layouts (TP, SP, CP, EP, PP, FSDP2, DeepSpeed) against one compiled process are in
tests/distributed/test_compile_layouts.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.schema import FaultInjection
from longcat.config.validate import validate as validate_run_config
from longcat.launch import preflight
from longcat.model.compile import dense_blocks
from longcat.testing.equivalence import max_relative_difference
from longcat.train.trainer import Trainer

COMPILE = {"train.compile": "true"}
CHECKS = {"determinism.enabled": "true", "sdc.replay_interval": 1}
MODEL = {"model.mtp_num_layers": 1, "loss.z_loss_coef": 1e-4}


def _trainer(corpus_cache, out_dir, **extra) -> Trainer:
    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **MODEL, **extra))
    validate_run_config(cfg, world_size=1)
    return Trainer(cfg, config_dict=cfg_dict)


def _losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step().loss.total for _ in range(steps)]


def test_dense_blocks_compile_and_train_as_eager(corpus_cache, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _trainer(corpus_cache, tmp_path / "eager")
    compiled = _trainer(corpus_cache, tmp_path / "compiled", **COMPILE)
    names = [name for name, _ in dense_blocks(compiled.model)]
    assert len(names) == 2 * 8 + 1 and names[-1] == "model.mtp"  # 2 layers x 8 blocks + the MTP head
    assert all(getattr(block, "_compiled_call_impl", None) is not None for _, block in dense_blocks(compiled.model))
    assert all(getattr(block, "_compiled_call_impl", None) is None for _, block in dense_blocks(eager.model))
    a, b = _losses(eager, 3), _losses(compiled, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # inductor ran, not a silent eager
    assert max_relative_difference(b, a) <= 1e-5, (b, a)
    ev_a, ev_b = eager.evaluate(), compiled.evaluate()  # no-grad graphs too
    assert abs(ev_b - ev_a) <= 1e-5 * abs(ev_a), (ev_b, ev_a)


def test_compiled_runs_are_bitwise_reproducible_with_activation_checkpointing(corpus_cache, tmp_path):
    first = _losses(_trainer(corpus_cache, tmp_path / "a", **COMPILE), 2)
    again = _losses(_trainer(corpus_cache, tmp_path / "b", **COMPILE), 2)
    recomputed = _losses(_trainer(corpus_cache, tmp_path / "c", **COMPILE,
                                  **{"train.activation_checkpointing": "true"}), 2)
    assert first == again
    assert max_relative_difference(recomputed, first) <= 1e-6, (recomputed, first)


def test_compiled_replay_is_clean_and_finds_faults(corpus_cache, tmp_path):
    """The SDC replay re-runs the compiled graphs: a clean step compares bit for bit, a flipped
    gradient bit and an activation fault in an eager module (the experts) are found."""
    trainer = _trainer(corpus_cache, tmp_path, **COMPILE, **CHECKS)
    _losses(trainer, 2)
    assert trainer.sdc.mismatches == [] and trainer.sdc.num_failed_checks == 0
    faults = [("gradient", "model.layers.0.self_attn.0.q_b_proj.weight", 0),
              ("activation", "model.layers.0.mlp.experts", 18)]
    for i, (target, tensor, bit) in enumerate(faults):
        step = trainer.step + 1
        trainer.sdc.arm(FaultInjection(step=step, rank=0, target=target, tensor=tensor, index=100 + 37 * i, bit=bit))
        trainer.train_step()
        assert [m.step for m in trainer.sdc.mismatches if m.step == step], (target, tensor)
        trainer.train_step()
    assert sorted({m.step for m in trainer.sdc.mismatches}) == [3, 5]


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.0.q_b_proj", "model.layers.0.input_layernorm.1",
                                    "model.mtp"])
def test_an_activation_fault_inside_a_compiled_block_is_refused(corpus_cache, tmp_path, tensor):
    fault = {"sdc.inject.step": 2, "sdc.inject.target": "activation", "sdc.inject.tensor": tensor}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **COMPILE, **CHECKS, **fault))
    with pytest.raises(ValueError, match=f"sdc.inject.tensor={tensor} .*train.compile=true"):
        validate_run_config(cfg, world_size=1)
    eager_cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **CHECKS, **fault))
    validate_run_config(eager_cfg, world_size=1)  # the same fault without compile is fine


def test_no_cpp_compiler_is_refused_before_work(corpus_cache, tmp_path):
    from torch._inductor import config as inductor_config

    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **COMPILE))
    preflight(cfg)
    # inductor's own override (monkeypatch's undo deleted the setting: later compiles then failed)
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler++")}):
        with pytest.raises(ValueError, match=r"train.compile=true on the CPU needs a C\+\+ compiler.*no-such"):
            preflight(cfg)
    assert inductor_config.cpp.cxx[-1] != "no-such-compiler++"
    # a "compiler" that runs but builds nothing a C++ program can load (like CXX=gcc: no libstdc++)
    fake = tmp_path / "fake-c++"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    with inductor_config.patch({"cpp.cxx": (None, str(fake))}):
        with pytest.raises(ValueError, match=r"a C\+\+ library built by .*fake-c\+\+' does not load or run"):
            preflight(cfg)
    cfg.train.compile = False
    preflight(cfg)
