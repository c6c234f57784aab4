import math

import pytest
import torch

from longcat.train import losses
from longcat.train.losses import IGNORE_INDEX, cross_entropy_sum


def _explicit_lb(probs_TE, topk_TK, *, n, k, k_e, d):
    """Eq. 3-5 written out token by token, as the LongCat-Flash report (arXiv 2509.01322) states them."""
    t, e = probs_TE.shape
    group_of = [i * d // n if i < n else d for i in range(e)]
    f = [0.0] * (d + 1)
    p = [0.0] * (d + 1)
    for tok in range(t):
        for idx in topk_TK[tok].tolist():
            g = group_of[idx]
            f[g] += (d / (k_e * t)) if g < d else 1.0 / ((k - k_e) * t)
        for i in range(e):
            p[group_of[i]] = p[group_of[i]] + probs_TE[tok, i] / t
    return sum(fj * pj for fj, pj in zip(f, p))


def test_load_balance_matches_explicit_formula_and_gradient():
    torch.manual_seed(0)
    n, z, k, k_e, d, t = 8, 4, 4, 2.5, 2, 7
    logits = torch.randn(t, n + z, requires_grad=True)
    probs = logits.softmax(-1)
    topk = probs.topk(k, dim=-1).indices
    counts = torch.zeros(n + z).scatter_add_(0, topk.flatten(), torch.ones(t * k))
    ours = losses.load_balance_loss(counts, probs.sum(0), torch.tensor(float(t)), n_routed_experts=n,
                                    moe_topk=k, expected_ffn_experts=k_e, num_groups=d)
    (g_ours,) = torch.autograd.grad(ours, logits, retain_graph=True)
    ref = _explicit_lb(probs, topk, n=n, k=k, k_e=k_e, d=d)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-8)
    assert g_ours.abs().sum() > 0


def test_load_balance_empty_micro_batch_is_zero():
    out = losses.load_balance_loss(torch.zeros(6), torch.zeros(6, requires_grad=True), torch.tensor(0.0),
                                   n_routed_experts=4, moe_topk=2, expected_ffn_experts=1.0, num_groups=1)
    assert out.item() == 0.0


def test_hidden_z_loss_formula_and_padding():
    h = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = sum(torch.logsumexp(h[b, s].abs(), -1) ** 2 for b in range(2) for s in range(3) if mask[b, s])
    assert torch.allclose(losses.hidden_z_loss_sum(h, mask), expected)


def test_mtp_labels_shift():
    labels = torch.tensor([[1, 2, 3, -100]])
    assert losses.mtp_labels(labels).tolist() == [[2, 3, -100, -100]]


def test_cross_entropy_sum_ignores_unlabelled():
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[0, -100, 2]])
    expected = -(logits[0, 0].log_softmax(-1)[0] + logits[0, 2].log_softmax(-1)[2])
    assert math.isclose(losses.cross_entropy_sum(logits, labels).item(), expected.item(), rel_tol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 5, 64, 1000])
def test_cross_entropy_sum_matches_torch_in_value_and_gradient(chunk_rows):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 7, 50, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    ours = cross_entropy_sum(logits, labels, chunk_rows=chunk_rows)
    (ours * 0.7).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum")
    (ref * 0.7).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(logits.grad[0, :3] == 0)  # unlabelled rows get no gradient


def test_cross_entropy_sum_of_bf16_logits_is_fp32_with_a_bf16_gradient():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 9, 40, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    loss = cross_entropy_sum(logits, labels, chunk_rows=4)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(logits.detach().float().flatten(0, 1), labels.flatten(), reduction="sum")
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        cross_entropy_sum(logits, labels, chunk_rows=0)
