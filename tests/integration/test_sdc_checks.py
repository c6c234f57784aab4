"""SDC detection in one process: replay changes nothing, finds every injected fault, never a clean step.

The replay check (``train/sdc_check.py``) re-runs a micro-batch's forward and backward and compares
the loss and every gradient bit for bit. Faults are single flipped bits (``sdc.inject`` /
``SDCMonitor.arm``) in an activation (a module's output in the first forward) or a gradient (after
the first backward); the multi-rank campaign (parameter faults found by the cross-replica check) is
in tests/distributed/test_sdc_parallel.py.

A fault is only detectable if it changes the computation: a flipped low mantissa bit of an
activation can be absorbed by rounding in the next addition, and the query of a sequence's first
token never matters (its attention weight is 1). The campaign flips elements and bits that do.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.schema import FaultInjection
from longcat.config.validate import validate as validate_run_config
from longcat.train.checkpoint import list_checkpoints
from longcat.train.nonfinite import NonFiniteCheckpointError
from longcat.train.trainer import Trainer

CHECKS = {"determinism.enabled": "true", "sdc.replay_interval": 1, "sdc.replica_interval": 1}

# (target, tensor, bit): activations by module name, gradients by parameter name.
REPLAY_CAMPAIGN = [
    ("activation", "model.embed_tokens", 3),
    ("activation", "model.layers.0.self_attn.0.q_b_proj", 22),
    ("activation", "model.layers.1.self_attn.0.o_proj", 14),
    ("activation", "model.layers.0.mlps.1.down_proj", 27),
    ("activation", "model.layers.0.mlp.experts", 18),
    ("activation", "model.layers.1.input_layernorm.0", 31),
    ("activation", "model.norm", 30),  # the LM head itself does not run: its GEMM is fused with the CE
    ("gradient", "model.layers.0.self_attn.0.q_b_proj.weight", 0),
    ("gradient", "model.layers.1.mlp.experts.down_proj", 31),
    ("gradient", "lm_head.weight", 17),
    ("gradient", "model.norm.weight", 23),
    ("gradient", "model.layers.0.mlp.router.classifier.weight", 9),
    ("gradient", "model.embed_tokens.weight", 30),
    ("gradient", "model.layers.1.mlps.0.gate_proj.weight", 12),
]


def _trainer(corpus_cache, out_dir, **extra) -> Trainer:
    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **extra))
    validate_run_config(cfg, world_size=1)
    return Trainer(cfg, config_dict=cfg_dict)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_replay_leaves_training_bitwise_unchanged(corpus_cache, tmp_path):
    """Capturing the replayed micro-batch in isolation (grads stashed, then added back) and replaying
    it changes no bit of the run: losses, grad norms and parameters equal a run without checks."""
    extra = {"determinism.enabled": "true", "model.mtp_num_layers": 1, "data.global_batch_size": 6}
    plain = _trainer(corpus_cache, tmp_path / "plain", **extra)
    checked = _trainer(corpus_cache, tmp_path / "checked", **{**extra, **CHECKS, "sdc.replay_microbatch": 1})
    for _ in range(4):
        a, b = plain.train_step(), checked.train_step()
        assert (a.loss.total, a.grad_norm) == (b.loss.total, b.grad_norm)
    assert checked.sdc.mismatches == []
    pa, pb = _params(plain), _params(checked)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_200_clean_steps_raise_no_false_alarm(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path, **CHECKS, **{"train.steps": 200, "moe.router_health_interval": 7})
    for _ in range(200):
        trainer.train_step()
    assert trainer.step == 200
    assert trainer.sdc.mismatches == [] and trainer.sdc.num_failed_checks == 0
    assert trainer.guard.num_skipped == 0


def test_replay_detects_every_injected_fault(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path, **CHECKS, **{"train.steps": 50})
    trainer.train_step()
    fault_steps = []
    for i, (target, tensor, bit) in enumerate(REPLAY_CAMPAIGN):
        step = trainer.step + 1
        trainer.sdc.arm(FaultInjection(step=step, rank=0, target=target, tensor=tensor, index=100 + 37 * i, bit=bit))
        trainer.train_step()
        assert trainer.sdc.injector.injected_at == step, (target, tensor)
        found = [m for m in trainer.sdc.mismatches if m.step == step]
        assert found, f"fault {i} ({target} {tensor} bit {bit}) at step {step} went undetected"
        assert all(m.check == "replay" and m.rank == 0 for m in found)
        if target == "gradient":  # exactly the corrupted gradient, both checksums reported
            assert [m.tensor for m in found] == [tensor] and found[0].first != found[0].second
        fault_steps.append(step)
        trainer.train_step()  # a clean step after each fault: no lingering alarm
    assert sorted({m.step for m in trainer.sdc.mismatches}) == fault_steps
    assert trainer.step_metrics(trainer.train_step(), 1.0)["sdc/failed_checks"] == len(REPLAY_CAMPAIGN)


def test_an_activation_fault_on_a_module_that_never_runs_is_refused(corpus_cache, tmp_path):
    """Under the fused head + CE the ``lm_head`` module is never called: the configuration refuses an
    activation fault on it, and an injector armed on it anyway (``SDCMonitor.arm``) raises instead of
    reporting a clean step; with ``loss.lm_head_ce=logits`` the fault is injected and found."""
    fault = {"sdc.inject.step": 2, "sdc.inject.target": "activation", "sdc.inject.tensor": "lm_head"}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path / "a"), **CHECKS, **fault))
    with pytest.raises(ValueError, match="sdc.inject.tensor=lm_head with sdc.inject.target=activation"):
        validate_run_config(cfg, world_size=1)
    armed = FaultInjection(step=2, rank=0, target="activation", tensor="lm_head", index=100, bit=30)
    fused = _trainer(corpus_cache, tmp_path / "fused", **CHECKS)
    fused.train_step()
    fused.sdc.arm(armed)
    with pytest.raises(ValueError, match="'lm_head': the module did not run"):
        fused.train_step()
    logits = _trainer(corpus_cache, tmp_path / "logits", **CHECKS, **{"loss.lm_head_ce": "logits"})
    logits.train_step()
    logits.sdc.arm(armed)
    logits.train_step()
    assert logits.sdc.injector.injected_at == 2 and [m.step for m in logits.sdc.mismatches][:1] == [2]


def _run_fit(corpus_cache, out_dir, **extra) -> Trainer:
    trainer = _trainer(corpus_cache, out_dir, **extra)
    trainer.fit()
    return trainer


FIT = {"train.steps": 6, "train.checkpoint_interval": 2, "train.eval_interval": 0, **CHECKS}
GRAD_FAULT = {"sdc.inject.step": 3, "sdc.inject.target": "gradient", "sdc.inject.tensor": "lm_head.weight",
              "sdc.inject.bit": 25}


def test_halt_stops_every_rank_without_saving_the_suspect_state(corpus_cache, tmp_path, caplog):
    from longcat.launch import run_training
    from longcat.train.sdc_check import SDC_EXIT_CODE

    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **FIT, **GRAD_FAULT,
                                                                  **{"sdc.policy": "halt"}))
    with caplog.at_level(logging.ERROR):
        assert run_training(cfg, cfg_dict) == SDC_EXIT_CODE
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    report = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 3 on rank 0" in report and "'lm_head.weight'" in report and "sdc.policy=halt" in report


def test_rollback_reloads_the_last_good_checkpoint(corpus_cache, tmp_path):
    """A transient fault at step 3 -> back to step 2's checkpoint -> steps 3..6 again: the result is
    bitwise the clean run's (the data position, LR schedule and optimizer state come back too)."""
    clean = _run_fit(corpus_cache, tmp_path / "clean", **FIT)
    rolled = _run_fit(corpus_cache, tmp_path / "rolled", **FIT, **GRAD_FAULT, **{"sdc.policy": "rollback"})
    assert [(m.step, m.tensor) for m in rolled.sdc.mismatches] == [(3, "lm_head.weight")]
    assert rolled.step == clean.step == 6
    pa, pb = _params(clean), _params(rolled)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_steps_trained_again_after_a_rollback_are_logged_once(corpus_cache, tmp_path):
    """A fault at step 4 rolls back to step 2's checkpoint: step 3, already logged, is trained and
    logged again; metrics.jsonl must hold it once (the second time)."""
    rolled = _run_fit(corpus_cache, tmp_path, **FIT, **{**GRAD_FAULT, "sdc.inject.step": 4},
                      **{"sdc.policy": "rollback"})
    assert [m.step for m in rolled.sdc.mismatches] == [4]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6], logged


def test_checkpoint_with_a_nonfinite_tensor_is_refused(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.model.norm.weight[3] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"model\.model\.norm\.weight"):
        trainer.save_checkpoint()
    trainer.model.model.norm.weight.data[3] = 1.0
    state = trainer.optimizer.state[trainer.model.lm_head.weight]
    state["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"optim\.state\.lm_head\.weight\.exp_avg_sq"):
        trainer.save_checkpoint()
    assert not (tmp_path / "checkpoints").exists() or list_checkpoints(tmp_path / "checkpoints") == []


def test_an_activation_fault_on_a_module_without_a_tensor_output_is_named(corpus_cache, tmp_path):
    """The router returns a RouterOutput: the configuration refuses it (tests/unit/config), and an
    injector armed on it anyway says why instead of failing on a missing ``clone``."""
    trainer = _trainer(corpus_cache, tmp_path, **CHECKS)
    trainer.train_step()
    trainer.sdc.arm(FaultInjection(step=2, rank=0, target="activation", tensor="model.layers.0.mlp.router",
                                   index=3, bit=20))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.router': that module returns a RouterOutput"):
        trainer.train_step()
