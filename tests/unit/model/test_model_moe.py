"""MoE pieces: grouped-GEMM experts vs a loop, dispatcher, router tie-breaking, MoEStats."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from longcat.config.schema import ModelConfig
from longcat.model import GroupedExperts, LongcatFlashForCausalLM, MoE, TopKRouter
from longcat.model.moe import workspace
from longcat.model.moe.dispatch import (
    DispatchHandle,
    permute_tokens,
    source_permutation,
    unpermute_tokens,
    weight_and_unpermute,
)
from longcat.model.moe.experts import grouped_linear, grouped_projections, swiglu
from longcat.model.moe.router import tie_broken_keys
from longcat.model.moe.workspace import scratch

CFG = ModelConfig(
    vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=6,
    zero_expert_num=3, moe_topk=3, expert_ffn_hidden_size=16, initializer_range=0.1,
)


def _experts(num_local_experts=4, hidden=16, inter=8, dtype=torch.float32):
    torch.manual_seed(0)
    experts = GroupedExperts(hidden, intermediate_size=inter, num_local_experts=num_local_experts).to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def _loop_reference(experts, x_RD, counts):
    outs, start = [], 0
    for e, n in enumerate(counts):
        x = x_RD[start : start + n]
        h = F.silu(F.linear(x, experts.gate_proj[e])) * F.linear(x, experts.up_proj[e])
        outs.append(F.linear(h, experts.down_proj[e]))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [0, 0, 0, 0]])
def test_grouped_experts_match_loop_and_unused_expert_grads_are_zero(counts):
    experts = _experts()
    x = torch.randn(sum(counts), 16, requires_grad=True)
    out = experts(x, counts_L=torch.tensor(counts))
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in experts.parameters()]

    ref_experts = _experts()
    x_ref = x.detach().clone().requires_grad_(True)
    if sum(counts):
        ref = _loop_reference(ref_experts, x_ref, counts)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        (ref * grad_out).sum().backward()
        want = [x_ref.grad] + [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in ref_experts.parameters()
        ]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    for e, n in enumerate(counts):
        if n == 0:
            for p in experts.parameters():
                assert torch.equal(p.grad[e], torch.zeros_like(p.grad[e]))


def test_grouped_experts_expanded_grad_and_unaligned_sizes():
    experts = _experts()
    x = torch.randn(6, 16, requires_grad=True)
    out = experts(x, counts_L=torch.tensor([2, 2, 1, 1]))
    # Not a view: FSDP2 shards the experts as their own module and warns about view outputs.
    assert out._base is None
    out.sum().backward()  # sum() hands back an expanded grad
    assert x.grad is not None
    for hidden, inter in [(16, 8), (12, 6)]:  # 12 or 6 elements: rows not 16-byte aligned, padded
        fp32 = _experts(hidden=hidden, inter=inter)
        x = torch.randn(5, hidden, requires_grad=True)
        out = fp32(x, counts_L=torch.tensor([1, 0, 3, 1]))
        assert out._base is None, (hidden, inter)
        out.square().sum().backward()
        ref_experts = copy.deepcopy(fp32)
        ref_experts.zero_grad()
        x_ref = x.detach().clone().requires_grad_(True)
        ref = _loop_reference(ref_experts, x_ref, [1, 0, 3, 1])
        ref.square().sum().backward()
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
        for p, p_ref in zip(fp32.parameters(), ref_experts.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-5)

        bf16 = _experts(hidden=hidden, inter=inter, dtype=torch.bfloat16)
        xb = torch.randn(5, hidden, dtype=torch.bfloat16, requires_grad=True)
        out = bf16(xb, counts_L=torch.tensor([1, 0, 3, 1]))
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
        ref = _loop_reference(copy.deepcopy(bf16).float(), xb.detach().float(), [1, 0, 3, 1])
        torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)

        # fp32 weights and input under bf16 autocast: the grouped GEMMs run in bf16, as F.linear does,
        # and the fp32 weights get fp32 gradients
        x32 = xb.detach().float().requires_grad_(True)
        fp32.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fp32(x32, counts_L=torch.tensor([1, 0, 3, 1]))
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16 and x32.grad.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in fp32.parameters())
        ref = _loop_reference(copy.deepcopy(fp32), x32.detach(), [1, 0, 3, 1])
        torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


def test_permute_and_unpermute_are_adjoint_and_gradcheck():
    T, K, D = 5, 3, 4
    slot_R = torch.tensor([14, 0, 7, 2, 9, 10, 3])
    handle = DispatchHandle(slot_R=slot_R, token_R=slot_R // K, num_tokens=T, top_k=K)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(slot_R), D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, handle=handle), (x,))
    assert torch.autograd.gradcheck(lambda r: unpermute_tokens(r, handle=handle), (y,))
    lhs = (permute_tokens(x, handle=handle) * y).sum()
    rhs = (x * unpermute_tokens(y, handle=handle)).sum()
    torch.testing.assert_close(lhs, rhs)


def _slot_buffer_combine(rows_SD, gates_S, handle, out_dtype):
    """The combine written plainly: (row x gate) into a zero-filled [T, K, D] slot buffer, then the K
    slots added one after another (k ascending, fp32 accumulation for reduced precision)."""
    T, K = handle.num_tokens, handle.top_k
    weighted_SD = (rows_SD * gates_S[:, None]).to(out_dtype)
    slots_TxKD = torch.zeros(T * K, rows_SD.shape[-1], dtype=out_dtype).index_copy(0, handle.slot_R, weighted_SD)
    slots_TKD = slots_TxKD.view(T, K, rows_SD.shape[-1]).float()
    out_TD = torch.zeros(T, rows_SD.shape[-1])
    for k in range(K):
        out_TD = out_TD + slots_TKD[:, k]
    return out_TD.to(out_dtype)


@pytest.mark.parametrize("rows_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("T,K,N,Z", [(64, 6, 8, 4), (3, 2, 4, 4), (0, 2, 4, 2)])
def test_weight_and_unpermute_is_bitwise_the_slot_buffer_sum(T, K, N, Z, rows_dtype, out_dtype):
    """The segment-sum combine (gather to slot order, gate in place, segment sum; fused backward)
    gives the bits of the slot-buffer formula with the slots added in k order, forward and both
    gradients, also for tokens whose slots are all zero experts and for no tokens at all."""
    gen = torch.Generator().manual_seed(T + K)
    expert_ids_TK = torch.randn(T, N + Z, generator=gen).topk(K, dim=-1).indices
    if T > 2:
        expert_ids_TK[1] = torch.arange(N, N + K)  # only zero experts: an empty segment
    gates_TK = torch.rand(T, K, generator=gen, requires_grad=True)
    S = int((expert_ids_TK < N).sum())
    rows_SD = (torch.randn(S, 16, generator=gen) * 3).to(rows_dtype).requires_grad_()
    grad_TD = torch.randn(T, 16, generator=gen).to(out_dtype)
    results = []
    for combine in (weight_and_unpermute, _slot_buffer_combine):
        perm = source_permutation(expert_ids_TK, gates_TK, num_experts=N)
        if combine is weight_and_unpermute:
            out_TD = combine(rows_SD, gates_S=perm.gates_S, handle=perm.handle, out_dtype=out_dtype)
        else:
            out_TD = combine(rows_SD, perm.gates_S, perm.handle, out_dtype)
        results.append((out_TD, *torch.autograd.grad(out_TD, (rows_SD, gates_TK), grad_TD)))
    for ours, plain in zip(*results):
        assert ours.dtype == plain.dtype and torch.equal(ours, plain)
    if T > 2:
        assert torch.count_nonzero(results[0][0][1]) == 0


def _gate_up_grads(fn, x_RD, gate_LID, up_LID, offs_L, grad_RI, *, needs=(True, True, True)):
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x_RD, gate_LID, up_LID), needs)]
    gate_RI, up_RI = fn(*leaves, offs_L)
    wanted = [t for t in leaves if t.requires_grad]
    return (gate_RI, up_RI, *torch.autograd.grad(swiglu(gate_RI, up_RI), wanted, grad_RI)), gate_RI.grad_fn


def _two_grouped_linears(x_RD, gate_LID, up_LID, offs_L):
    return grouped_linear(x_RD, gate_LID, offs_L=offs_L), grouped_linear(x_RD, up_LID, offs_L=offs_L)


def _fused(x_RD, gate_LID, up_LID, offs_L):
    return grouped_projections(x_RD, gate_LID, up_LID, offs_L=offs_L)


@pytest.mark.parametrize("I,D", [(176, 512), (24, 32), (2048, 64)])  # 2048: an inner dim over BLAS's block
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False)])
def test_grouped_projections_are_bitwise_grouped_linears(I, D, needs):
    """The fused CPU fp32 path (one input-gradient buffer: mm, then mm + add per expert) gives the bits of
    two grouped_linear calls and autograd's sum, forward and every gradient, also for experts with no
    row, one row (BLAS's gemv case), rows past the last offset (no gradient) and an intermediate size
    (the inner dim of the input gradient's GEMMs) over BLAS's block, where addmm_ would differ."""
    gen = torch.Generator().manual_seed(I)
    counts_L = torch.tensor([0, 1, 37, 2, 0, 300, 1, 64])
    R = int(counts_L.sum()) + 3  # three rows no expert owns
    offs_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
    x_RD = torch.randn(R, D, generator=gen)
    gate_LID, up_LID = (torch.randn(8, I, D, generator=gen) / D**0.5 for _ in range(2))
    grad_RI = torch.randn(R, I, generator=gen)
    ours, ours_fn = _gate_up_grads(_fused, x_RD, gate_LID, up_LID, offs_L, grad_RI, needs=needs)
    plain, plain_fn = _gate_up_grads(_two_grouped_linears, x_RD, gate_LID, up_LID, offs_L, grad_RI, needs=needs)
    assert type(ours_fn).__name__ == "_CPUGroupedProjectionsBackward" != type(plain_fn).__name__
    assert len(ours) == len(plain)
    for a, b in zip(ours, plain):
        assert torch.equal(a[: int(offs_L[-1])], b[: int(offs_L[-1])]) if a.shape[0] == R else torch.equal(a, b)
    if needs[0]:
        assert torch.count_nonzero(ours[2][int(offs_L[-1]):]) == 0


def test_one_grouped_projection_is_bitwise_grouped_linear():
    """The down projection's case: one weight, its input gradient written into the workspace."""
    gen = torch.Generator().manual_seed(5)
    counts_L = torch.tensor([2, 0, 1, 90, 33])
    offs_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
    h_RI, grad_RD = torch.randn(126, 176, generator=gen), torch.randn(126, 512, generator=gen)
    down_LDI = torch.randn(5, 512, 176, generator=gen) / 176**0.5
    results = []
    for fn in (lambda h, w: grouped_projections(h, w, offs_L=offs_L)[0],
               lambda h, w: grouped_linear(h, w, offs_L=offs_L)):
        h, w = h_RI.clone().requires_grad_(), down_LDI.clone().requires_grad_()
        out_RD = fn(h, w)
        results.append((out_RD, *torch.autograd.grad(out_RD, (h, w), grad_RD)))
    assert type(results[0][0].grad_fn).__name__ == "_CPUGroupedProjectionsBackward"
    for ours, plain in zip(*results):
        assert torch.equal(ours, plain)


def test_grouped_projections_outside_cpu_fp32_are_grouped_linear_and_double_backward_is_autograds():
    gen = torch.Generator().manual_seed(3)
    counts_L = torch.tensor([3, 0, 5])
    offs_L = torch.cumsum(counts_L, 0, dtype=torch.int32)
    x_RD, grad_RI = torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)
    gate_LID, up_LID = (torch.randn(3, 8, 16, generator=gen) for _ in range(2))
    bf16 = (t.to(torch.bfloat16) for t in (x_RD, gate_LID, up_LID))  # grouped_linear: its casts, autocast
    _, fn = _gate_up_grads(_fused, *bf16, offs_L, grad_RI.to(torch.bfloat16))
    assert type(fn).__name__ != "_CPUGroupedProjectionsBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate_RI, _ = grouped_projections(x_RD.requires_grad_(), gate_LID, up_LID, offs_L=offs_L)
    assert gate_RI.dtype == torch.bfloat16
    results = []
    for fn in (_fused, _two_grouped_linears):
        x, g, u = (t.detach().clone().requires_grad_() for t in (x_RD, gate_LID, up_LID))
        gate_RI, up_RI = fn(x, g, u, offs_L)
        (grad_x,) = torch.autograd.grad(swiglu(gate_RI, up_RI).square().sum(), (x,), create_graph=True)
        results.append(torch.autograd.grad(grad_x.square().sum(), (x, g, u)))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_bitwise_autograds_silu_times_up(dtype):
    gen = torch.Generator().manual_seed(1)
    gate, up, grad = (torch.randn(37, 12, generator=gen).to(dtype) * 4 for _ in range(3))
    results = []
    for fn in (swiglu, lambda g, u: F.silu(g) * u):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = fn(g, u)
        results.append((out, *torch.autograd.grad(out, (g, u), grad)))
    for ours, plain in zip(*results):
        assert ours.dtype == plain.dtype == dtype and torch.equal(ours, plain)
    g = gate.clone().requires_grad_()  # only one input needs a gradient
    (grad_gate,) = torch.autograd.grad(swiglu(g, up), (g,), grad)
    assert torch.equal(grad_gate, results[1][1])


def test_swiglu_second_derivatives_are_autograds():
    gen = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(9, 5, generator=gen) for _ in range(2))
    results = []
    for fn in (swiglu, lambda g, u: F.silu(g) * u):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        (grad_g,) = torch.autograd.grad(fn(g, u).square().sum(), (g,), create_graph=True)
        results.append(torch.autograd.grad(grad_g.square().sum(), (g, u)))
    for ours, plain in zip(*results):
        assert torch.equal(ours, plain)


def test_workspace_is_not_taken_under_inference_mode_or_fake_tensors():
    """Made there, it would be an inference tensor (a training call may not write to it) or a fake one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from longcat.model.moe import workspace

    workspace._WORKSPACE.buffers.clear()
    g, u = torch.randn(64, 16), torch.randn(64, 16)
    with torch.inference_mode():
        swiglu(g, u)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        swiglu(mode.from_tensor(g), mode.from_tensor(u))
    assert not workspace._WORKSPACE.buffers
    out = swiglu(g.requires_grad_(), u)
    assert type(out) is torch.Tensor and torch.equal(out, F.silu(g) * u)
    out.sum().backward()


def test_scratch_reuses_the_workspace_only_when_nothing_holds_it():
    a = scratch((40, 8), dtype=torch.float32, device=torch.device("cpu"))
    ptr = a.data_ptr()
    del a
    b = scratch((30, 8), dtype=torch.float32, device=torch.device("cpu"))  # idle again: reused
    assert b.data_ptr() == ptr and b.shape == (30, 8) and b.is_contiguous()
    b.fill_(1.0)
    c = scratch((30, 8), dtype=torch.float32, device=torch.device("cpu"))  # b holds it: a new tensor
    assert c.data_ptr() != ptr
    c.fill_(2.0)
    assert torch.equal(b, torch.ones(30, 8))
    saved = b[3:5]  # a view keeps it busy too
    del b, c
    assert scratch((30, 8), dtype=torch.float32, device=torch.device("cpu")).data_ptr() != ptr
    del saved
    bigger = scratch((4000, 8), dtype=torch.float32, device=torch.device("cpu"))  # grows
    assert bigger.shape == (4000, 8)
    assert scratch((1, 8), dtype=torch.bfloat16, device=torch.device("cpu")).dtype == torch.bfloat16


def test_scratch_slots_serve_temporaries_alive_at_once_and_no_more():
    cpu = torch.device("cpu")
    workspace._WORKSPACE.buffers.pop(torch.float16, None)
    held = [scratch((100 * (i + 1), 4), dtype=torch.float16, device=cpu) for i in range(workspace._WORKSPACE_SLOTS)]
    ptrs = {t.data_ptr() for t in held}
    extra = scratch((10, 4), dtype=torch.float16, device=cpu)  # every slot busy: a new tensor
    assert extra.data_ptr() not in ptrs and len(workspace._WORKSPACE.buffers[torch.float16]) == len(held)
    assert workspace.held_bytes() >= sum(t.nbytes for t in held)
    for i, t in enumerate(held):
        t.fill_(i)
    small, large = held[0].data_ptr(), held[-1].data_ptr()
    del held[0], held[-1]
    assert scratch((50, 4), dtype=torch.float16, device=cpu).data_ptr() == small  # the smallest idle one fitting
    big = scratch((1000, 4), dtype=torch.float16, device=cpu)  # none fits: the largest idle one regrown
    assert big.shape == (1000, 4) and big.data_ptr() not in (small, large)
    for i, t in enumerate(held, start=1):  # the busy ones kept their values
        assert torch.equal(t, torch.full_like(t, i))
    assert len(workspace._WORKSPACE.buffers[torch.float16]) == workspace._WORKSPACE_SLOTS


def test_combine_gradient_held_by_a_hook_survives_the_next_combine():
    """The combine's backward hands a workspace view to autograd; a hook that keeps it must keep its
    values while later combines run (the workspace is busy, so they get new memory)."""
    gen = torch.Generator().manual_seed(0)
    T, K, N, Z = 16, 4, 6, 3
    held, results = [], []
    for _ in range(2):
        expert_ids_TK = torch.randn(T, N + Z, generator=gen).topk(K, dim=-1).indices
        gates_TK = torch.rand(T, K, generator=gen)
        perm = source_permutation(expert_ids_TK, gates_TK, num_experts=N)
        rows_SD = torch.randn(int(perm.counts_N.sum()), 8, generator=gen, requires_grad=True)
        rows_SD.register_hook(lambda g: held.append(g) or g)
        out_TD = weight_and_unpermute(rows_SD, gates_S=perm.gates_S, handle=perm.handle, out_dtype=torch.float32)
        out_TD.backward(torch.randn(T, 8, generator=gen))
        results.append(rows_SD.grad.clone())
    for g, want in zip(held, results):
        assert torch.equal(g, want)


def _dense_moe_reference(moe: MoE, u_TD):
    """sum_k gate_k * E_k(u) with a Python loop over tokens and slots."""
    route = moe.router(u_TD)
    out = torch.zeros_like(u_TD)
    ex = moe.experts
    for t in range(u_TD.shape[0]):
        for k in range(route.expert_ids_TK.shape[1]):
            e = int(route.expert_ids_TK[t, k])
            x = u_TD[t]
            if e < moe.num_ffn_experts:
                x = F.linear(F.silu(F.linear(x, ex.gate_proj[e])) * F.linear(x, ex.up_proj[e]), ex.down_proj[e])
            out[t] = out[t] + route.gates_TK[t, k] * x
    return out


def test_moe_layer_matches_dense_reference_forward_and_backward():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(CFG)
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        moe.router.e_score_correction_bias.normal_(0, 0.05)
    u = torch.randn(2, 7, CFG.hidden_size, requires_grad=True)
    out, _ = moe(u)
    out.square().sum().backward()
    got = [u.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    u.grad = None
    moe.zero_grad()
    ref = _dense_moe_reference(moe, u.view(14, -1)).view(2, 7, -1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    ref.square().sum().backward()
    want = [u.grad] + [p.grad for p in moe.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_router_ties_pick_lower_expert_id():
    router = TopKRouter(8, num_experts=10, top_k=4, routed_scaling_factor=1.0)
    with torch.no_grad():
        router.classifier.weight.zero_()  # uniform probabilities: every score ties
    route = router(torch.randn(5, 8))
    assert route.expert_ids_TK.tolist() == [[0, 1, 2, 3]] * 5
    with torch.no_grad():
        router.e_score_correction_bias[[2, 5, 7, 9]] = 1.0
    assert router(torch.randn(3, 8)).expert_ids_TK.tolist() == [[2, 5, 7, 9]] * 3
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[[6, 8]] = 0.5
    assert router(torch.randn(2, 8)).expert_ids_TK.tolist() == [[6, 8, 0, 1]] * 2


def test_tie_broken_keys_order_as_a_stable_descending_sort():
    """topk of the keys = the first K of torch.sort(descending, stable), with ties, signed zeros, infinities,
    NaNs of either sign (the sort puts them first), subnormals and negative scores."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45, -1e-45,
                            3.4e38, -3.4e38, 1.0, -1.0])
    for E, K in ((2, 1), (10, 4), (96, 12), (192, 12), (100, 100)):
        scores = torch.randn(64, E, generator=gen)
        scores = torch.where(torch.rand(64, E, generator=gen) < 0.3,
                             special[torch.randint(0, len(special), (64, E), generator=gen)], scores)
        scores[:, E // 2] = scores[:, 0]
        expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :K]
        assert torch.equal(torch.topk(tie_broken_keys(scores), K, dim=-1).indices, expected)
    with pytest.raises(TypeError, match="fp32"):
        tie_broken_keys(torch.zeros(2, 3, dtype=torch.float64))


def test_router_repr_names_its_settings():
    assert "top_k=4, routed_scaling_factor=1.5" in repr(TopKRouter(8, num_experts=10, top_k=4,
                                                                    routed_scaling_factor=1.5))


def test_router_computes_in_fp32_under_bf16_autocast():
    """train.bf16 runs the model under autocast, which would run the classifier in bf16: the
    routing (logits, probabilities, top-K, gates) must be exactly the fp32 router's."""
    torch.manual_seed(0)
    router = TopKRouter(64, num_experts=48, top_k=12, routed_scaling_factor=6.0)
    u_TD = torch.randn(256, 64).bfloat16()  # what a bf16 layer hands the router
    want = router(u_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(u_TD)
    assert got.probs_TE.dtype == got.gates_TK.dtype == torch.float32
    assert torch.equal(got.probs_TE, want.probs_TE)
    assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)
    assert torch.equal(got.gates_TK, want.gates_TK)


def test_expert_bias_stays_fp32_on_dtype_cast():
    model = LongcatFlashForCausalLM(CFG)
    with torch.no_grad():
        model.model.layers[0].mlp.router.e_score_correction_bias.fill_(1e-4 + 1.0)
    model.to(torch.bfloat16)
    bias = model.model.layers[0].mlp.router.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(1.0001, abs=1e-7)
    assert "model.layers.0.mlp.router.e_score_correction_bias" in model.state_dict()
    out = model(torch.randint(0, CFG.vocab_size, (2, 8)))
    assert out.logits_BSV.dtype == torch.bfloat16


def test_moe_stats_are_correct_and_exclude_padding():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(dataclasses.replace(CFG, num_layers=1))
    N, E, K = CFG.n_routed_experts, CFG.num_experts_total, CFG.moe_topk
    real = torch.randint(0, CFG.vocab_size, (2, 6))
    padded = torch.cat([real, torch.randint(0, CFG.vocab_size, (2, 3))], dim=1)  # right padding
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, :6] = True

    stats_real = model(real).moe_stats[0]
    stats_pad = model(padded, token_mask_BS=mask).moe_stats[0]
    # Causal attention: right padding changes nothing for the real tokens, so neither do the stats.
    assert torch.equal(stats_pad.expert_counts_E, stats_real.expert_counts_E)
    assert torch.equal(stats_pad.ffn_per_token_T, stats_real.ffn_per_token_T)
    torch.testing.assert_close(stats_pad.prob_sum_E, stats_real.prob_sum_E, atol=1e-5, rtol=1e-5)
    assert stats_pad.num_tokens.item() == 12 and stats_real.num_tokens.item() == 12

    # Recompute by hand from the router.
    moe = model.model.layers[0].mlp
    captured = {}
    hook = moe.register_forward_pre_hook(lambda mod, args: captured.setdefault("u", args[0]))
    out = model(padded, token_mask_BS=mask)
    hook.remove()
    route = moe.router(captured["u"].reshape(-1, CFG.hidden_size))
    ids_real = route.expert_ids_TK[mask.reshape(-1)]
    stats = out.moe_stats[0]
    assert stats.expert_counts_E.dtype == torch.float32 and stats.expert_counts_E.shape == (E,)
    assert torch.equal(stats.expert_counts_E, torch.bincount(ids_real.reshape(-1), minlength=E).float())
    assert stats.expert_counts_E.sum() == K * 12
    assert torch.equal(stats.ffn_per_token_T, (ids_real < N).sum(-1).float())
    torch.testing.assert_close(stats.prob_sum_E, route.probs_TE[mask.reshape(-1)].sum(0))
    assert stats.prob_sum_E.requires_grad and not stats.expert_counts_E.requires_grad
    stats.prob_sum_E[0].backward()
    assert moe.router.classifier.weight.grad.abs().sum() > 0
