import math

import pytest
import torch

from longcat.train import losses, router_health


def test_cosine_similarity_extremes():
    assert router_health.router_cosine_similarity(torch.eye(4)) == pytest.approx(0.0)
    same = torch.ones(3, 5)
    assert router_health.router_cosine_similarity(same) == pytest.approx(1.0)


def test_gradient_norm_ratio_is_linear_in_alpha():
    torch.manual_seed(0)
    t, n, z, k = 16, 6, 2, 2
    logits = torch.randn(t, n + z, requires_grad=True)
    probs = logits.softmax(-1)
    topk = probs.topk(k, -1).indices
    counts = torch.zeros(n + z).scatter_add_(0, topk.flatten(), torch.ones(t * k))
    lm = (probs * torch.randn(t, n + z)).sum()
    lb = losses.load_balance_loss(counts, probs.sum(0), torch.tensor(float(t)), n_routed_experts=n, moe_topk=k,
                                  expected_ffn_experts=1.5, num_groups=2)
    (g_lm,) = router_health.grad_wrt_mean_probs(lm, [probs])
    ratios = []
    for alpha in (0.01, 0.02):
        (g_lb,) = router_health.grad_wrt_mean_probs(alpha * lb, [probs])
        ratios.append(router_health.gradient_norm_ratio(g_lb, g_lm))
    assert ratios[1] == pytest.approx(2 * ratios[0])
    # the LB gradient wrt P is alpha * f_group(i): check against Eq. 4 directly
    (g_lb,) = router_health.grad_wrt_mean_probs(lb, [probs])
    f_groups = [counts[:3].sum() * 2 / (1.5 * t), counts[3:6].sum() * 2 / (1.5 * t), counts[6:].sum() / (0.5 * t)]
    expected = torch.tensor([f_groups[0]] * 3 + [f_groups[1]] * 3 + [f_groups[2]] * 2)
    torch.testing.assert_close(g_lb, expected.float(), rtol=1e-5, atol=1e-7)


def test_suggest_lb_coef_caps_ratio():
    assert router_health.suggest_lb_coef(0.01, [0.05, 0.02], threshold=0.1) == 0.01
    assert router_health.suggest_lb_coef(0.01, [0.4, 0.2], threshold=0.1) == pytest.approx(0.0025)
    assert math.isfinite(router_health.suggest_lb_coef(0.01, [float("inf")], threshold=0.1))
