"""Trainer-level invariants: micro-batch split invariance, exact resume, the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.train.callbacks import Callback, fit_callbacks
from longcat.train.trainer import LossParts, Trainer


def _trainer(corpus_cache, out_dir, callbacks=(), **extra) -> Trainer:
    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **extra))
    validate_run_config(cfg, world_size=1)
    return Trainer(cfg, config_dict=cfg_dict, callbacks=callbacks)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batch_split_gives_same_loss_and_grads(corpus_cache, tmp_path):
    """Micro-batches holding 2, 5, 9 and 16 labelled tokens == the unsplit batch (CE, MTP, z-loss)."""
    trainer = _trainer(corpus_cache, tmp_path, **{"model.mtp_num_layers": 1, "loss.z_loss_coef": 1e-3,
                                                  "moe.lb_loss_coef": 0.0})
    mb = next(iter(trainer.data.train))
    ids = torch.cat([mb["input_ids"], mb["input_ids"]])[:4]
    labels = torch.full_like(ids, -100)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for row, n in enumerate((2, 5, 9, 16)):
        labels[row, :n] = ids[row, 1:n + 1]
        mask[row, n + 4:] = False  # right padding after a few unlabelled real tokens (an SFT prompt)
    full = {"input_ids": ids, "labels": labels, "token_mask": mask}
    splits = [{k: v[i:i + 1] for k, v in full.items()} for i in range(4)]

    trainer.model.zero_grad(set_to_none=True)
    parts_full = LossParts()
    trainer.forward_backward(full, trainer._global_counts([full]), parts_full)
    grads_full = _grads(trainer.model)

    trainer.model.zero_grad(set_to_none=True)
    parts_split = LossParts()
    counts = trainer._global_counts(splits)
    for part in splits:
        trainer.forward_backward(part, counts, parts_split)
    grads_split = _grads(trainer.model)

    assert counts.num_labels == 32
    for field in ("ce", "mtp", "z"):
        assert getattr(parts_split, field) == pytest.approx(getattr(parts_full, field), rel=1e-5, abs=1e-9)
    assert parts_full.mtp > 0 and parts_full.z > 0
    assert grads_full.keys() == grads_split.keys()
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_padding_is_excluded_from_router_stats(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path)
    mb = next(iter(trainer.data.train))
    mb["token_mask"][:, 20:] = False
    mb["labels"][:, 20:] = -100
    stats = trainer.forward_backward(mb, trainer._global_counts([mb]), LossParts())
    k = trainer.cfg.model.moe_topk
    for s in stats:
        assert s.num_tokens.item() == 2 * 20
        assert s.expert_counts_E.sum().item() == 2 * 20 * k


def _run_steps(trainer: Trainer, n: int) -> list[float]:
    return [trainer.train_step().loss.total for _ in range(n)]


def test_resume_reproduces_uninterrupted_run_exactly(corpus_cache, tmp_path):
    """Stop after step 3, resume: losses, parameters, optimizer moments, LR, data and biases match."""
    straight = _trainer(corpus_cache, tmp_path / "a")
    losses_straight = _run_steps(straight, 6)

    first = _trainer(corpus_cache, tmp_path / "b")
    losses_first = _run_steps(first, 3)
    first.save_checkpoint()
    del first
    resumed = _trainer(corpus_cache, tmp_path / "b")
    assert resumed.step == 3
    losses_resumed = losses_first + _run_steps(resumed, 3)

    assert losses_resumed == losses_straight  # bitwise, fp32 CPU
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(b.abs().sum() > 0 for b in resumed.biases_L), "the bias controller never moved"
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in sa:
        assert torch.equal(sa[key]["exp_avg_sq"], sb[key]["exp_avg_sq"])
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert straight.data.train.state_dict() == resumed.data.train.state_dict()


def test_different_model_config_checkpoint_is_refused(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path)
    _run_steps(trainer, 1)
    trainer.save_checkpoint()
    with pytest.raises(ValueError, match="hidden_size"):
        _trainer(corpus_cache, tmp_path, **{"model.hidden_size": 64})


def test_cli_trains_and_writes_everything(corpus_cache, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "longcat.train", *tiny_overrides(corpus_cache, str(out))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final_val_loss" in proc.stdout and "checkpoints:" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "grad_norm", "tokens_per_s", "moe/layer0/ffn_experts_per_token",
                "moe/layer1/load_max_over_mean", "moe/layer0/expert_load"):
        assert key in steps[-1], key
    assert any("val/loss" in r for r in records)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    plot = subprocess.run([sys.executable, "tools/plot_metrics.py", "--metrics", str(out / "metrics.jsonl")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert plot.returncode == 0, plot.stderr
    assert (out / "plots" / "expert_load.png").stat().st_size > 1000


def test_init_from_allows_a_new_rope_base_but_not_new_shapes(corpus_cache, tmp_path):
    """A new stage (long context) may raise rope_theta; a changed width is still refused."""
    first = _trainer(corpus_cache, tmp_path / "stage1")
    _run_steps(first, 1)
    ckpt = first.save_checkpoint()
    second = _trainer(corpus_cache, tmp_path / "stage2", **{"train.init_from": str(ckpt), "model.rope_theta": 50000.0})
    assert second.step == 0
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="hidden_size"):
        _trainer(corpus_cache, tmp_path / "stage3", **{"train.init_from": str(ckpt), "model.hidden_size": 64})


class _Recorder(Callback):
    """Sees each step after fit's Evaluate, LogMetrics and Checkpoint; stops the run at ``stop_at``."""

    def __init__(self, stop_at: int):
        self.stop_at, self.seen, self.phases = stop_at, [], []

    def on_step_end(self, trainer, state):
        logged = [json.loads(line)["step"] for line in state.sink.jsonl_path.read_text().splitlines()]
        self.seen.append((trainer.step, "val/loss" in state.metrics, logged[-1], trainer.checkpoints.last_saved_step))
        state.stop = trainer.step == self.stop_at

    def on_save_phase(self, phase, *, step, path, rank):
        self.phases.append((phase, step))


def test_fit_runs_its_callbacks_in_order_and_an_extra_one_after_the_checkpoint(corpus_cache, tmp_path):
    recorder = _Recorder(stop_at=4)
    trainer = _trainer(corpus_cache, tmp_path, callbacks=[recorder])  # 6 steps; eval and checkpoint every 3
    assert [type(c).__name__ for c in fit_callbacks(trainer.cfg, extra=[recorder])] == [
        "Evaluate", "LogMetrics", "Checkpoint", "_Recorder", "Preemption"]
    summary = trainer.fit()
    assert recorder.seen == [(1, False, 1, None), (2, False, 2, None), (3, True, 3, 3), (4, False, 4, 3)]
    assert summary["final_step"] == 4 and "preempted_at_step" not in summary
    assert [phase for phase, step in recorder.phases] == ["shards", "state", "rename", "retention"]
