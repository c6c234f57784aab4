"""Computation-budget control and the stability suite through the real Trainer (one process).

Bias controller (Eq. 2): the same trajectory for a global batch of 4 sequences run as 4 x 1 or 1 x 4
micro-batches (dp 2 x 2: tests/distributed/test_budget_control_parallel.py); recompute on or off
counts the same; an overloaded expert's bias goes down; k-th place ties go to the lower id; padding
never counts. Load-balance loss (Eq. 3-5): one term per layer, its router gradient linear in alpha.
R_g (Eq. 9), automatic alpha, router cosine similarity, last-hidden norm: logged, checkpointed, and
measuring them changes no training number.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.testing.equivalence import run_single
from longcat.train import losses
from longcat.train.trainer import LossParts, Trainer

K_E = 1.5  # tiny_overrides: N = 4 FFN + Z = 2 zero experts, top-2
TWO_MB = {"data.micro_batch_size": 1, "data.global_batch_size": 2}  # steps of two 1 x 16 micro-batches


def _cfg(corpus_cache, out_dir, **extra):
    overrides = {"data.seq_length": 16, "train.eval_interval": 0, "train.checkpoint_interval": 0,
                 "moe.bias_update_rate": 0.2, **extra}
    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **overrides))
    validate_run_config(cfg, world_size=1)
    return cfg, cfg_dict


def _trainer(corpus_cache, out_dir, **extra) -> Trainer:
    cfg, cfg_dict = _cfg(corpus_cache, out_dir, **extra)
    return Trainer(cfg, config_dict=cfg_dict)


def global_batches(num_steps: int, *, rows: int = 4, seq: int = 16, vocab: int = 512, pad_last: int = 0):
    """Per step 4 single-sequence micro-batches (all labelled; the last ``pad_last`` positions of
    every row padding)."""
    gen = torch.Generator().manual_seed(11)
    steps = []
    for _ in range(num_steps):
        batch = []
        for _ in range(rows):
            ids = torch.randint(0, vocab, (1, seq), generator=gen)
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = losses.IGNORE_INDEX
            mask = torch.ones_like(ids, dtype=torch.bool)
            if pad_last:
                mask[:, -pad_last:] = False
                labels[:, -pad_last - 1:] = losses.IGNORE_INDEX
            batch.append({"input_ids": ids, "labels": labels, "token_mask": mask})
        steps.append(batch)
    return steps


def merged(batch: list[dict]) -> list[dict]:
    """The same global batch as one micro-batch."""
    return [{k: torch.cat([mb[k] for mb in batch]) for k in batch[0]}]


# ----------------------------------------------------------------------------- bias controller
def test_bias_trajectory_same_for_4x1_and_1x4(corpus_cache, tmp_path):
    """The controller sees the global batch's counts whatever the split (LB off: Eq. 3-5 is per
    micro-batch by definition, so with it on the two objectives, hence the weights, differ)."""
    steps = global_batches(3)
    cfg_1x4, _ = _cfg(corpus_cache, tmp_path / "a", **{"data.micro_batch_size": 1, "moe.lb_loss_coef": 0.0})
    cfg_4x1, _ = _cfg(corpus_cache, tmp_path / "b", **{"data.micro_batch_size": 4, "moe.lb_loss_coef": 0.0})
    split = run_single(cfg_1x4, num_steps=3, batches=steps)
    whole = run_single(cfg_4x1, num_steps=3, batches=[merged(b) for b in steps])
    for step in range(3):
        for layer, bias in split.biases[step].items():
            assert torch.equal(bias, whole.biases[step][layer]), (step, layer)
    assert all(b.abs().sum() > 0 for b in split.biases[-1].values()), "the bias controller never moved"


def test_activation_recompute_gives_the_same_counts(corpus_cache, tmp_path):
    """Recompute on/off: identical counts (each micro-batch counted once), biases and losses, with
    R_g measured (an extra partial backward through the recomputed layers) on the first step."""
    steps = global_batches(2)
    results = {}
    for ckpt in (False, True):
        trainer = _trainer(corpus_cache, tmp_path / str(ckpt), **{"train.activation_checkpointing": ckpt,
                                                                   "moe.router_health_interval": 1, **TWO_MB})
        results[ckpt] = [(trainer.train_step(b[:2]), [x.clone() for x in trainer.biases_L]) for b in steps]
    k = 2
    for (plain, biases_plain), (ckpt, biases_ckpt) in zip(results[False], results[True]):
        assert torch.equal(plain.router_counts_LE, ckpt.router_counts_LE)
        tokens = plain.router_counts_LE[:, -1]
        assert tokens.tolist() == [2 * 16] * 2
        assert torch.equal(plain.router_counts_LE[:, :-1].sum(-1), k * tokens)  # not doubled by the recompute
        assert plain.loss.total == ckpt.loss.total
        assert all(torch.equal(a, b) for a, b in zip(biases_plain, biases_ckpt))
        assert plain.stability["moe/layer1/rg"] == ckpt.stability["moe/layer1/rg"]


def test_overloaded_expert_gets_its_bias_lowered(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path, **{"data.micro_batch_size": 4})
    cfg = trainer.cfg
    n, k, mu = cfg.model.n_routed_experts, cfg.model.moe_topk, cfg.moe.bias_update_rate
    with torch.no_grad():
        trainer.biases_L[0][0] = 1.0  # expert 0 wins every token of layer 0: far above its share
    before = [b.clone() for b in trainer.biases_L]
    result = trainer.train_step(merged(global_batches(1)[0]))
    counts_E, tokens = result.router_counts_LE[0, :-1], result.router_counts_LE[0, -1]
    assert counts_E[0] == tokens
    delta_N = (trainer.biases_L[0] - before[0])[:n].double()
    expected_N = mu * (K_E / (k * n) - counts_E[:n] / (k * tokens))
    torch.testing.assert_close(delta_N, expected_N, rtol=1e-5, atol=1e-7)
    assert delta_N[0] < 0
    assert torch.equal(torch.sign(delta_N), torch.sign(K_E / n - counts_E[:n] / tokens))  # share vs load
    assert torch.equal(trainer.biases_L[0][n:], before[0][n:])  # zero-expert biases never move


def test_kth_place_ties_go_to_the_lower_expert_id_every_time(corpus_cache, tmp_path):
    """Zeroed routers: every score ties; FFN expert 3 is lifted, so the k-th (2nd) place is a tie
    between all the others, which expert 0 wins for every token, in every run."""
    runs = []
    for attempt in range(2):
        trainer = _trainer(corpus_cache, tmp_path / str(attempt), **TWO_MB)
        with torch.no_grad():
            for router, bias in zip(trainer.routers_L, trainer.biases_L):
                router.classifier.weight.zero_()
                bias[3] = 0.1
        batch = global_batches(1)[0]
        runs.append(trainer.train_step(batch[:2]).router_counts_LE)
    tokens = runs[0][0, -1]
    for layer in range(runs[0].shape[0]):
        assert runs[0][layer, :-1].tolist() == [tokens, 0, 0, tokens, 0, 0]
    assert torch.equal(runs[0], runs[1])


def test_padding_is_excluded_from_controller_counts_and_hidden_norm(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path, **TWO_MB)
    batch = global_batches(1, pad_last=5)[0][:2]
    result = trainer.train_step(batch)
    assert result.router_counts_LE[:, -1].tolist() == [2 * 11] * 2
    assert result.router_counts_LE[:, :-1].sum(-1).tolist() == [2 * 2 * 11] * 2
    # Padding changes nothing for the real tokens (causal attention, right padding): the logged
    # last-hidden norm is the mean over the real tokens only.
    twin = _trainer(corpus_cache, tmp_path / "twin", **TWO_MB)
    cut = [{k: v[:, :11] for k, v in mb.items()} for mb in batch]
    ref = twin.train_step(cut)
    assert result.stability["hidden/last_l2_norm"] == pytest.approx(ref.stability["hidden/last_l2_norm"], rel=1e-5)
    assert torch.equal(result.router_counts_LE, ref.router_counts_LE)


# ----------------------------------------------------------------------------- load-balance loss
def _router_grads(trainer, mb, alpha):
    trainer.stability.lb_coef = alpha
    trainer.model.zero_grad(set_to_none=True)
    parts = LossParts()
    trainer.forward_backward(mb, trainer._global_counts([mb]), parts)
    return torch.cat([r.classifier.weight.grad.flatten() for r in trainer.routers_L]), parts


def test_lb_gradient_reaches_the_router_and_doubles_with_alpha(corpus_cache, tmp_path):
    trainer = _trainer(corpus_cache, tmp_path, **{**TWO_MB, "moe.router_health_interval": 0})
    mb = merged(global_batches(1)[0][:2])[0]
    g0, _ = _router_grads(trainer, mb, 0.0)
    g1, parts1 = _router_grads(trainer, mb, 0.05)
    g2, _ = _router_grads(trainer, mb, 0.1)
    lb1, lb2 = g1 - g0, g2 - g0
    assert lb1.norm() > 1e-3 * g0.norm()
    torch.testing.assert_close(lb2, 2 * lb1, rtol=1e-3, atol=1e-4 * lb1.abs().max().item())
    # One term per layer (Eq. 3-5 per MoE layer), adding up to the objective's LB part.
    assert len(parts1.stability.lb_L) == trainer.cfg.model.num_layers
    assert sum(parts1.stability.lb_L) == pytest.approx(parts1.lb, rel=1e-6)


def test_lb_is_one_term_per_layer(corpus_cache, tmp_path):
    """The objective's LB part is the sum of Eq. 3-5 computed layer by layer (each layer's own
    counts and probabilities; pooling differs, tests/unit/train/test_stability.py)."""
    trainer = _trainer(corpus_cache, tmp_path, **{**TWO_MB, "moe.router_health_interval": 0})
    with torch.no_grad():  # layer 0 routes to FFN experts only, layer 1 to zero experts only
        trainer.biases_L[0][:4] = 1.0
        trainer.biases_L[1][4:] = 1.0
    mb = merged(global_batches(1)[0][:2])[0]
    out = trainer.model(mb["input_ids"], token_mask_BS=mb["token_mask"])
    kw = dict(n_routed_experts=4, moe_topk=2, expected_ffn_experts=K_E, num_groups=trainer.objective.lb_num_groups)
    per_layer = [losses.load_balance_loss(s.expert_counts_E, s.prob_sum_E, s.num_tokens, **kw).item()
                 for s in out.moe_stats]
    parts = LossParts()
    trainer.model.zero_grad(set_to_none=True)
    trainer.forward_backward(mb, trainer._global_counts([mb]), parts)
    scale = trainer.cfg.moe.lb_loss_coef / trainer.accum
    assert parts.stability.lb_L == pytest.approx([scale * v for v in per_layer], rel=1e-6)
    assert parts.lb == pytest.approx(scale * sum(per_layer), rel=1e-6)
    assert per_layer[0] != pytest.approx(per_layer[1], rel=0.1)


# ----------------------------------------------------------------------------- stability suite
def test_rg_is_logged_linear_in_alpha_and_measuring_changes_nothing(corpus_cache, tmp_path):
    steps = global_batches(2)
    runs = {}
    for name, extra in {"off": {"moe.router_health_interval": 0},
                        "on": {"moe.router_health_interval": 1},
                        "2alpha": {"moe.router_health_interval": 1, "moe.lb_loss_coef": 0.02}}.items():
        trainer = _trainer(corpus_cache, tmp_path / name, **{**TWO_MB, **extra})
        runs[name] = ([trainer.train_step(b[:2]) for b in steps], trainer)
    (off, t_off), (on, t_on) = runs["off"], runs["on"]
    assert [r.loss.total for r in off] == [r.loss.total for r in on]
    assert [r.grad_norm for r in off] == [r.grad_norm for r in on]
    for a, b in zip(t_off.model.parameters(), t_on.model.parameters()):
        assert torch.equal(a, b)
    assert "moe/layer0/rg" not in off[0].stability
    assert 0 < on[0].stability["moe/rg_max"] < float("inf")
    for layer in range(2):  # (0 for a layer whose groups happen to be exactly balanced)
        rg = on[0].stability[f"moe/layer{layer}/rg"]
        # Same first step, alpha doubled: R_g doubles (the LM part is untouched).
        assert runs["2alpha"][0][0].stability[f"moe/layer{layer}/rg"] == pytest.approx(2 * rg, rel=1e-5, abs=1e-12)


def test_auto_lb_coef_caps_rg_and_is_checkpointed(corpus_cache, tmp_path):
    extra = {**TWO_MB, "moe.router_health_interval": 1, "moe.auto_lb_coef": True,
             "moe.rg_threshold": 1e-3, "moe.lb_loss_coef": 0.05}
    trainer = _trainer(corpus_cache, tmp_path, **extra)
    steps = global_batches(3)
    first = trainer.train_step(steps[0][:2])
    assert first.stability["moe/rg_max"] > 1e-3 and first.stability["moe/lb_coef"] == 0.05
    alpha = trainer.stability.lb_coef
    assert alpha == pytest.approx(0.05 * 1e-3 / first.stability["moe/rg_max"])
    second = trainer.train_step(steps[1][:2])
    assert second.stability["moe/lb_coef"] == alpha
    assert second.stability["moe/rg_max"] == pytest.approx(1e-3, rel=0.5)  # one step later, on the threshold
    trainer.save_checkpoint()
    resumed = _trainer(corpus_cache, tmp_path, **extra)
    assert resumed.step == 2 and resumed.stability.lb_coef == trainer.stability.lb_coef


def test_dashboard_metrics_every_step_and_collapse_warning(corpus_cache, tmp_path, caplog):
    trainer = _trainer(corpus_cache, tmp_path, **{**TWO_MB, "moe.router_collapse_threshold": -1.0})
    batch = global_batches(1)[0][:2]
    with torch.no_grad():
        before = [trainer.model(mb["input_ids"], token_mask_BS=mb["token_mask"]).moe_stats for mb in batch]
    with caplog.at_level(logging.WARNING, logger="longcat.train.stability"):
        result = trainer.train_step(batch)
    assert "router collapse warning" in caplog.text
    metrics = trainer.step_metrics(result, 1.0)
    for layer in range(2):
        for key in ("ffn_experts_per_token", "ffn_experts_per_token_min", "ffn_experts_per_token_max",
                    "ffn_experts_per_token_std", "zero_expert_share", "load_max_over_mean", "expert_load",
                    "lb_loss", "rg", "router_cosine_similarity"):
            assert f"moe/layer{layer}/{key}" in metrics, key
    for key in ("loss/lb", "loss/z", "hidden/last_l2_norm", "moe/lb_coef", "moe/rg_max"):
        assert key in metrics, key
    assert json.dumps(metrics)  # plain values only
    # The histogram-based min / max / std / mean equal the direct ones over every real token.
    for layer in range(2):
        values = torch.cat([stats[layer].ffn_per_token_T for stats in before]).double()
        assert result.ffn_per_token_stats[layer][:2] == (values.min().item(), values.max().item())
        assert result.ffn_per_token_stats[layer][2] == pytest.approx(values.std(unbiased=False).item(), rel=1e-9)
        assert metrics[f"moe/layer{layer}/ffn_experts_per_token"] == pytest.approx(values.mean().item(), rel=1e-9)


def test_plots_include_router_health(corpus_cache, tmp_path):
    from longcat.plots import plot_all

    trainer = _trainer(corpus_cache, tmp_path, **{**TWO_MB, "train.steps": 4,
                                                  "moe.router_health_interval": 2})
    trainer.fit()
    paths = plot_all(tmp_path / "metrics.jsonl", tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"loss.png", "ffn_experts_per_token.png", "expert_load.png", "stability.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)
    from longcat.plots import budget_summary, read_metrics

    rows = budget_summary(read_metrics(tmp_path / "metrics.jsonl"), target=K_E)
    assert [r["layer"] for r in rows] == [0, 1] and all(r["window"] == (4, 4) for r in rows)
