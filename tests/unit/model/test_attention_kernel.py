"""``causal_attention``: v zero-padded to the q/k head dim on CPU so that SDPA takes its flash kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from longcat.model.attention import causal_attention

B, H, S, K, O = 2, 3, 40, 24, 16


def _qkv(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, S, d, generator=gen, dtype=dtype).requires_grad_() for d in (K, K, O)]


def _math(q, k, v, scale):
    """The plain formula: softmax(q k^T * scale + causal mask) v."""
    scores = q @ k.transpose(-2, -1) * scale
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_padded_v_matches_the_formula_forward_and_backward():
    q, k, v = _qkv()
    out = causal_attention(q, k, v, scale=0.2)
    assert out.shape == (B, H, S, O)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = _math(q2, k2, v2, 0.2)
    want_grads = torch.autograd.grad(want.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _kernels(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_takes_the_flash_kernel_when_v_is_narrower(dtype):
    q, k, v = _qkv(dtype)
    ours = _kernels(lambda: causal_attention(q, k, v, scale=0.2).float().sum().backward())
    plain = _kernels(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2).float().sum()
                     .backward())
    assert any("flash" in name for name in ours), ours
    assert not any("flash" in name for name in plain), plain  # what the padding avoids: the math path
