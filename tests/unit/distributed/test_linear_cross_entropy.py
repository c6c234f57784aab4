"""The fused LM head + cross-entropy against the unfused head and CE (one process; the vocab-parallel
case is in tests/distributed/test_tensor_parallel.py), and the model's fused forward."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.distributed.linear_cross_entropy import (
    chunk_rows_for,
    grads_in_forward,
    linear_cross_entropy_sum,
    lm_head_cross_entropy_sum,
)
from longcat.model import LongcatFlashForCausalLM
from longcat.train.losses import IGNORE_INDEX, cross_entropy_sum, mtp_labels

T, D, V = 50, 16, 96


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h_TD = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
    w_VD = (torch.randn(V, D, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels_T = torch.randint(0, V, (T,), generator=gen)
    labels_T[::4] = IGNORE_INDEX
    return h_TD, w_VD, labels_T


def _assert_grad_close(actual, expected):
    """1e-5 relative to the tensor's largest entry (fp32 sums in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _reference(h_TD, w_VD, labels_T, scale=1.0):
    h, w = h_TD.detach().clone().requires_grad_(), w_VD.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w).float(), labels_T, ignore_index=IGNORE_INDEX, reduction="sum")
    (scale * loss).backward()
    return loss.detach(), h.grad, w.grad


IN_FORWARD = pytest.mark.parametrize("in_forward", [True, False], ids=["grads-in-forward", "recompute"])


@IN_FORWARD
@pytest.mark.parametrize("chunk_rows", [7, 16, 50, 64])
def test_fp32_equals_linear_then_cross_entropy(chunk_rows, in_forward):
    h, w, labels = _inputs()
    ref_loss, ref_dh, ref_dw = _reference(h, w, labels, scale=0.37)
    loss = linear_cross_entropy_sum(h, w, labels, chunk_rows=chunk_rows, in_forward=in_forward)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    (0.37 * loss).backward()  # the incoming gradient scales both gradients
    _assert_grad_close(h.grad, ref_dh)
    _assert_grad_close(w.grad, ref_dw)


@IN_FORWARD
def test_bf16_autocast_matches_the_unfused_autocast_head(in_forward):
    h, w, labels = _inputs(seed=1)
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = cross_entropy_sum(F.linear(hr, wr)[None], labels[None])
        loss = linear_cross_entropy_sum(h, w, labels, chunk_rows=16, in_forward=in_forward)
    ref.backward()
    loss.backward()
    # The same bf16 logits, fp32 log-sum-exp: the losses agree to fp32 summation order.
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert h.grad.dtype == w.grad.dtype == torch.float32
    # Gradients: bf16 GEMMs in both; the unfused weight gradient is rounded to bf16 once, ours once per
    # chunk and summed in fp32.
    for ours, theirs in [(h.grad, hr.grad), (w.grad, wr.grad)]:
        assert (ours - theirs).norm() <= 1e-2 * theirs.norm()


@IN_FORWARD
def test_only_the_wanted_gradients_and_none_without_grad(in_forward):
    h, w, labels = _inputs(seed=2)
    with torch.no_grad():
        loss = linear_cross_entropy_sum(h, w, labels, in_forward=in_forward)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, w, labels)[0], rtol=1e-6, atol=0)
    _, ref_dh, ref_dw = _reference(h, w, labels)
    frozen_w = w.detach()
    linear_cross_entropy_sum(h, frozen_w, labels, in_forward=in_forward).backward()
    assert frozen_w.grad is None
    _assert_grad_close(h.grad, ref_dh)
    frozen_h = h.detach()
    linear_cross_entropy_sum(frozen_h, w, labels, in_forward=in_forward).backward()
    assert frozen_h.grad is None
    _assert_grad_close(w.grad, ref_dw)


@IN_FORWARD
def test_a_second_order_gradient_is_refused(in_forward):
    """Not a silently wrong (or missing) second-order term: the backward is once-differentiable."""
    h, w, labels = _inputs(seed=6)
    loss = linear_cross_entropy_sum(h, w, labels, in_forward=in_forward)
    dh, = torch.autograd.grad(loss, [h], grad_outputs=torch.ones((), requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dh.sum().backward()


def test_a_retained_graph_gives_the_same_gradients_twice():
    """R_g (Eq. 9) takes a gradient of the objective before the real backward (retain_graph)."""
    for in_forward in (True, False):
        h, w, labels = _inputs(seed=4)
        loss = linear_cross_entropy_sum(h, w, labels, in_forward=in_forward)
        first = torch.autograd.grad(loss, [h, w], retain_graph=True)
        loss.backward()
        assert torch.equal(first[0], h.grad) and torch.equal(first[1], w.grad)


def test_grads_in_forward_only_when_the_buffer_is_no_bigger_than_the_logits():
    assert grads_in_forward(2048, 512)  # the small preset's micro-batch
    assert not grads_in_forward(1024, 6144)  # LongCat-Flash under cp = 8
    assert grads_in_forward(6144, 6144)


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    h, w, _ = _inputs(seed=3)
    loss = linear_cross_entropy_sum(h, w, torch.full((T,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and not h.grad.any() and not w.grad.any()


def test_bad_input_is_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy_sum(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy_sum(h, w, labels[:-1])
    with pytest.raises(ValueError, match="differ outside autocast"):
        linear_cross_entropy_sum(h.double(), w, labels)
    with pytest.raises(ValueError, match="has a bias"):
        lm_head_cross_entropy_sum(nn.Linear(D, V), h, labels)


def test_chunk_rows_are_cache_sized_on_cpu_and_gemm_sized_on_accelerators():
    assert chunk_rows_for(8192) == 256  # 8 MiB of fp32 logits
    assert chunk_rows_for(131072) == 16  # LongCat-Flash's vocabulary, one device
    assert chunk_rows_for(10**7) == 16  # never below the floor
    assert chunk_rows_for(131072, device_type="cuda") == 512  # 256 MiB
    assert chunk_rows_for(8192, device_type="cuda") == 8192
    assert chunk_rows_for(10**7, device_type="cuda") == 512


MODEL_CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, mtp_num_layers=1,
)


@pytest.mark.parametrize("tied", [False, True])
def test_model_forward_with_labels_equals_the_logits_path(tied):
    cfg = dataclasses.replace(MODEL_CFG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(cfg)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg)
    gen = torch.Generator().manual_seed(5)
    ids_BS = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    labels_BS = torch.roll(ids_BS, -1, dims=1)
    labels_BS[:, -1] = IGNORE_INDEX
    ref_out = ref(ids_BS)
    ref_loss = cross_entropy_sum(ref_out.logits_BSV, labels_BS) + 0.3 * cross_entropy_sum(
        ref_out.mtp_logits_BSV, mtp_labels(labels_BS))
    ref_loss.backward()
    out = model(ids_BS, labels_BS=labels_BS, mtp_labels_BS=mtp_labels(labels_BS))
    assert out.logits_BSV is None and out.mtp_logits_BSV is None
    loss = out.ce_sum + 0.3 * out.mtp_ce_sum
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    loss.backward()
    for name, param in model.named_parameters():  # fp32 sums in another order: 1e-5 of the largest entry
        expected = ref.get_parameter(name).grad
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)
    # Without MTP labels the MTP head runs but has no loss.
    assert model(ids_BS, labels_BS=labels_BS).mtp_ce_sum is None
    with pytest.raises(ValueError, match="mtp_labels_BS given without labels_BS"):
        model(ids_BS, mtp_labels_BS=labels_BS)
