import logging

import pytest
import torch

from longcat.config.schema import ModelConfig, MoEConfig, ParallelConfig, RunConfig
from longcat.config.validate import validate
from longcat.model.moe import MoEStats
from longcat.train import losses, router_health
from longcat.train.stability import StabilityMonitor, StabilitySums

L, E, K = 2, 6, 2


def _monitor(**moe) -> StabilityMonitor:
    cfg = MoEConfig(expected_ffn_experts=1.5, lb_loss_coef=0.01, **moe)
    return StabilityMonitor(cfg, num_layers=L, num_experts=E, top_k=K)


def _stats(ffn_per_token: list[list[int]]) -> list[MoEStats]:
    return [MoEStats(expert_counts_E=torch.zeros(E), prob_sum_E=torch.zeros(E), num_tokens=torch.tensor(1.0),
                     ffn_per_token_T=torch.tensor(v, dtype=torch.float32)) for v in ffn_per_token]


def _routers(weights):
    routers = []
    for w in weights:
        r = torch.nn.Module()
        r.classifier = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            r.classifier.weight.copy_(w)
        routers.append(r)
    return routers


def test_ffn_per_token_min_max_std_over_all_micro_batches():
    mon = _monitor()
    mon.begin_step(1)  # not a measuring step (interval 10)
    stats = [_stats([[0, 2, 1], [2, 2]]), _stats([[1, 1], [0]])]
    out = mon.end_step(StabilitySums(), stats, routers=[], dp_group=None)
    layer0 = torch.tensor([0.0, 2, 1, 1, 1])
    assert out.ffn_per_token_stats[0] == (0.0, 2.0, pytest.approx(layer0.std(unbiased=False).item()))
    assert out.ffn_per_token_stats[1][:2] == (0.0, 2.0)
    assert out.metrics["moe/ffn_experts_per_token"] == pytest.approx((1.0 + 4 / 3) / 2)
    assert "moe/layer0/rg" not in out.metrics


def test_auto_alpha_drops_above_threshold_and_grows_back_to_the_ceiling():
    mon = _monitor(auto_lb_coef=True, rg_threshold=0.1)
    mon._update_lb_coef([0.4, 0.2])
    assert mon.lb_coef == pytest.approx(0.0025)
    mon._update_lb_coef([0.1, 0.05])  # on the threshold at 0.0025: stays
    assert mon.lb_coef == pytest.approx(0.0025)
    mon._update_lb_coef([0.01, 0.01])  # healthy: back to the configured alpha, never above
    assert mon.lb_coef == 0.01
    off = _monitor(rg_threshold=0.1)
    off._update_lb_coef([5.0])
    assert off.lb_coef == 0.01


def test_auto_alpha_state_round_trip_is_capped_by_the_config():
    mon = _monitor(auto_lb_coef=True)
    mon.load_state_dict({"lb_coef": 0.003})
    assert mon.state_dict() == {"lb_coef": 0.003}
    mon.load_state_dict({"lb_coef": 1.0})  # a checkpoint from a run with a larger alpha
    assert mon.lb_coef == 0.01
    plain = _monitor()
    plain.load_state_dict({"lb_coef": 0.003})  # auto off: the configured alpha rules
    assert plain.lb_coef == 0.01


def test_collapse_warning_once_per_crossing(caplog):
    mon = _monitor(router_collapse_threshold=0.9)
    same, spread = torch.ones(E, 4), torch.eye(E, 8)
    with caplog.at_level(logging.WARNING, logger="longcat.train.stability"):
        for weights in ([same, spread], [same, spread], [spread, spread], [same, spread]):
            mon.begin_step(1)
            out = mon.end_step(StabilitySums(), [], routers=_routers(weights), dp_group=None)
    assert caplog.text.count("router collapse warning") == 2
    assert out.metrics["moe/layer0/router_cosine_similarity"] == pytest.approx(1.0)
    assert out.metrics["moe/layer1/router_cosine_similarity"] == pytest.approx(0.0)


def test_measure_and_rg_from_gradients():
    """R_g from two hand-made objectives on probs: tangent parts of alpha*f and of the LM gradient."""
    torch.manual_seed(0)
    mon = _monitor(router_health_interval=1)
    mon.begin_step(0)
    assert mon.wants_measurement
    logits = [torch.randn(5, E, requires_grad=True) for _ in range(L)]
    probs = [x.softmax(-1) for x in logits]
    mask = torch.tensor([True, True, True, True, False])
    stats = [MoEStats(expert_counts_E=torch.tensor([2.0, 1, 1, 1, 2, 1]), prob_sum_E=(p * mask[:, None]).sum(0),
                      num_tokens=torch.tensor(4.0), ffn_per_token_T=torch.ones(4), probs_TE=p, token_mask_T=mask)
             for p in probs]
    w_E = torch.randn(E)
    rest = sum((p * w_E).sum() for p in probs)
    kw = dict(n_routed_experts=4, moe_topk=K, expected_ffn_experts=1.5, num_groups=2)
    lb_terms = [0.01 * losses.load_balance_loss(s.expert_counts_E, s.prob_sum_E, s.num_tokens, **kw) for s in stats]
    mon.measure(rest=rest, lb_terms_L=lb_terms, stats=stats)
    assert not mon.wants_measurement
    out = mon.end_step(StabilitySums(), [], routers=[], dp_group=None)
    # d rest / dP summed over the 4 real tokens = 4 w; d lb / dP = alpha * f_group (Eq. 4).
    counts = stats[0].expert_counts_E
    f = torch.tensor([counts[:2].sum() * 2 / (1.5 * 4)] * 2 + [counts[2:4].sum() * 2 / (1.5 * 4)] * 2
                     + [counts[4:].sum() / (0.5 * 4)] * 2)
    lb_t, lm_t = router_health.simplex_tangent(0.01 * f), router_health.simplex_tangent(4 * w_E)
    assert out.metrics["moe/layer0/rg"] == pytest.approx((lb_t.norm() / lm_t.norm()).item(), rel=1e-5)
    assert out.metrics["moe/rg_max"] == max(out.metrics["moe/layer0/rg"], out.metrics["moe/layer1/rg"])


def test_grad_wrt_mean_probs_masks_padding():
    probs = torch.rand(3, 4, requires_grad=True)
    weights = torch.tensor([[1.0], [2.0], [4.0]])
    loss = (probs * weights).sum()
    (full,) = router_health.grad_wrt_mean_probs(loss, [probs])
    (real,) = router_health.grad_wrt_mean_probs(loss, [probs], token_masks_LT=[torch.tensor([True, True, False])])
    assert full.tolist() == [7.0] * 4 and real.tolist() == [3.0] * 4


def test_lb_per_layer_differs_from_pooled():
    """Eq. 3-5 is bilinear in (f, P): pooling two layers' counts and probabilities is not the sum of
    the layers' losses, hence the trainer's one term per layer."""
    kw = dict(n_routed_experts=4, moe_topk=2, expected_ffn_experts=1.5, num_groups=2)
    counts = [torch.tensor([4.0, 0, 0, 0, 0, 0]), torch.tensor([0.0, 0, 0, 0, 2, 2])]
    probs = [torch.tensor([1.6, 0.2, 0.1, 0.1, 0, 0]), torch.tensor([0.1, 0.1, 0, 0, 0.9, 0.9])]
    t = torch.tensor(2.0)
    per_layer = sum(losses.load_balance_loss(c, p, t, **kw) for c, p in zip(counts, probs))
    pooled = 2 * losses.load_balance_loss(sum(counts), sum(probs), 2 * t, **kw)
    assert abs(per_layer - pooled) > 0.5


def test_auto_lb_coef_accepted_under_pipeline_and_config_validation():
    cfg = RunConfig(moe=MoEConfig(auto_lb_coef=True), parallel=ParallelConfig(pp=2))
    validate(cfg, world_size=2)  # R_g is measured per stage and combined over pp (train/stability.py)
    model = ModelConfig(n_routed_experts=4, zero_expert_num=2, moe_topk=2)
    with pytest.raises(ValueError, match="router_health_interval"):
        MoEConfig(expected_ffn_experts=1.5, router_health_interval=-1).validate(model)
    with pytest.raises(ValueError, match="rg_threshold"):
        MoEConfig(expected_ffn_experts=1.5, rg_threshold=0.0).validate(model)
