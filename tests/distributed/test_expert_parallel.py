"""Expert parallelism and the MoE under TP vs the single-process reference (gloo, 2 and 4 ranks).

Every rank builds the same full model from fixed seeds and the tokens of every dp rank, runs the
single-process reference on each dp rank's tokens (the union batch, summed), and checks its own
part of the parallel run: the forward output for its tokens, the expert-weight grads gathered over
ep and summed over edp, the router grad summed over dp, and the input grad.

Routing cases are forced with the expert bias (used for selection only):
    uneven          random bias, expert 0 favoured
    empty_expert    expert 1 chosen by no token (its grads must be exact zeros)
    empty_rank      the last ep rank's experts chosen by no token (it receives no rows)
    zero_only       every slot goes to a zero expert (nothing is dispatched anywhere)
    one_rank_idle   the last dp rank's tokens choose only zero experts (it sends nothing)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.model import LongcatFlashForCausalLM, MoE
from longcat.model.moe.dispatch import AllGatherTokenDispatcher, AllToAllTokenDispatcher
from longcat.model.parallel.expert_parallel import (
    apply_expert_parallel,
    expert_param_global_info,
    expert_shard_to_dtensor,
)
from longcat.testing import run_distributed

TIMEOUT_S = 60
RTOL, ATOL = 1e-5, 1e-6
N, Z, K = 4, 3, 3  # FFN experts, zero experts, top-k (K = Z so a token can pick zero experts only)
CFG = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32, q_lora_rank=8,
    kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=N,
    zero_expert_num=Z, moe_topk=K, expert_ffn_hidden_size=8, initializer_range=0.2,
)
CASES = ("uneven", "empty_expert", "empty_rank", "zero_only", "one_rank_idle")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bias(case, *, dp_rank, dp_size, ep_size):
    """The expert bias [N + Z] of one dp rank's router (identical over its tp ranks)."""
    bias = 0.05 * torch.randn(N + Z, generator=_gen(11))
    bias[0] += 0.3
    if case == "empty_expert":
        bias[1] = -10.0
    elif case == "empty_rank":
        bias[N - N // ep_size : N] = -10.0
    elif case == "zero_only" or (case == "one_rank_idle" and dp_rank == dp_size - 1):
        bias[N:] = 10.0
    return bias


def _moe():
    moe = MoE(CFG)
    with torch.no_grad():
        for i, p in enumerate(moe.parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=_gen(100 + i)))
    return moe


def _global_expert_grad(param, groups):
    """Local [L, ...] grad -> all_gather(ep) -> [N, ...] -> all_reduce(edp): the global expert grad."""
    grad = torch.zeros_like(param) if param.grad is None else param.grad
    full = grad.new_empty((grad.shape[0] * groups.ep_size,) + tuple(grad.shape[1:]))
    # [L, ...] this rank's experts -> all_gather(ep) -> [N, ...] by global expert id
    dist.all_gather_into_tensor(full, grad.contiguous(), group=groups.ep_group)
    # [N, ...] grads of this edp replica's tokens -> all_reduce(edp) -> [N, ...] whole batch
    dist.all_reduce(full, group=groups.edp_group)
    return full


def _dp_sum(grad, groups):
    out = grad.clone()
    dist.all_reduce(out, group=groups.dp_group)  # [*] -> all_reduce(dp) -> [*]
    return out


def _check_moe_case(case, groups, dispatcher, B=2, S=4):
    D, dp, d = CFG.hidden_size, groups.dp_size, groups.dp_rank
    u_all = torch.randn(dp, B, S, D, generator=_gen(1))
    gout_all = torch.randn(dp, B, S, D, generator=_gen(2))
    w_all = torch.randn(dp, N + Z, generator=_gen(3))
    biases = [_bias(case, dp_rank=r, dp_size=dp, ep_size=groups.ep_size) for r in range(dp)]

    # Reference: one process, every dp rank's tokens in turn (grads accumulate: the union batch).
    ref = _moe()
    ref_out, ref_u_grad, ref_ids = [], [], []
    for r in range(dp):
        ref.router.e_score_correction_bias.copy_(biases[r])
        u = u_all[r].clone().requires_grad_()
        out, stats = ref(u)
        ((out * gout_all[r]).sum() + (stats.prob_sum_E * w_all[r]).sum()).backward()
        ref_out.append(out.detach())
        ref_u_grad.append(u.grad)
        ref_ids.append(ref.router(u_all[r].reshape(B * S, D)).expert_ids_TK)

    moe = _moe()
    moe.router.e_score_correction_bias.copy_(biases[d])
    apply_expert_parallel(moe, groups=groups, dispatcher=dispatcher)
    assert moe.experts.num_local_experts == N // groups.ep_size
    assert moe.experts.expert_offset == groups.ep_rank * N // groups.ep_size
    u = u_all[d].clone().requires_grad_()
    out, stats = moe(u)
    ((out * gout_all[d]).sum() + (stats.prob_sum_E * w_all[d]).sum()).backward()

    torch.testing.assert_close(out, ref_out[d], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(u.grad, ref_u_grad[d], rtol=RTOL, atol=ATOL)
    # The router saw the whole micro-batch on every tp rank: its grad is identical across tp.
    router_grad = moe.router.classifier.weight.grad
    if groups.tp_size > 1:
        peers = [torch.empty_like(router_grad) for _ in range(groups.tp_size)]
        dist.all_gather(peers, router_grad, group=groups.tp_group)  # [E, D] -> all_gather(tp) -> tp x [E, D]
        assert all(torch.equal(p, router_grad) for p in peers)
    torch.testing.assert_close(
        _dp_sum(router_grad, groups), ref.router.classifier.weight.grad, rtol=RTOL, atol=ATOL
    )
    for name in ("gate_proj", "up_proj", "down_proj"):
        got = _global_expert_grad(getattr(moe.experts, name), groups)
        want = getattr(ref.experts, name).grad
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        if case == "empty_expert":
            assert torch.equal(got[1], torch.zeros_like(got[1]))
        if case in ("empty_rank", "zero_only"):
            mine = getattr(moe.experts, name).grad
            if case == "zero_only" or groups.ep_rank == groups.ep_size - 1:
                assert mine is None or torch.equal(mine, torch.zeros_like(mine)), (case, name, mine)

    # Only FFN-expert slots (all-to-all) or tokens with an FFN slot, once per ep rank (all-gather), of
    # this tp rank's token slice were sent; no zero-expert row ever was.
    t = B * S // groups.tp_size
    my_ids = ref_ids[d][groups.tp_rank * t : (groups.tp_rank + 1) * t]
    expected_rows = int((my_ids < N).sum())
    if dispatcher == "allgather":
        expected_rows = int((my_ids < N).any(dim=-1).sum()) * groups.ep_size
    if isinstance(moe.dispatcher, (AllToAllTokenDispatcher, AllGatherTokenDispatcher)):
        assert (dispatcher == "allgather") == isinstance(moe.dispatcher, AllGatherTokenDispatcher)
        counters = moe.dispatcher.counters()
        assert counters.zero_expert_rows_sent == 0
        assert counters.dispatched_rows == expected_rows and counters.num_dispatches == 1
        if dispatcher == "allgather":  # to peers: U rows + 2K ids/gates each, and A - U partials back
            G, U, A = groups.ep_size, expected_rows // groups.ep_size, counters.received_rows
            assert counters.peer_bytes_sent == U * (G - 1) * (D + 2 * K) * 4 + (A - U) * D * 4, counters
        return counters.dispatched_rows, counters.received_rows
    return expected_rows, expected_rows


def _check_overlap_split(groups, dispatcher):
    """start -> dense work -> run_experts -> dense work -> finish gives the same bits as forward."""
    moe = _moe()
    apply_expert_parallel(moe, groups=groups, dispatcher=dispatcher)
    u = torch.randn(2, 4, CFG.hidden_size, generator=_gen(5 + groups.dp_rank))
    with torch.no_grad():
        want, _ = moe(u)
        state = moe.start(u)
        busy = torch.randn(32, 32, generator=_gen(6)) @ torch.randn(32, 32, generator=_gen(7))
        state = moe.run_experts(state)
        busy = busy @ busy
        got, _ = moe.finish(state)
    assert torch.equal(got, want) and busy.shape == (32, 32)


def _moe_body(layouts, cases, dispatcher):
    rows = []
    for index, kwargs in enumerate(layouts):
        groups = ProcessGroups.build(ParallelDims(dist.get_world_size(), **kwargs))
        last_ep_rank = groups.ep_rank == groups.ep_size - 1
        for case in cases:
            sent, received = _check_moe_case(case, groups, dispatcher)
            rows.append(dict(layout=index, case=case, sent=sent, received=received, last_ep_rank=last_ep_rank))
        _check_overlap_split(groups, dispatcher)
    return rows


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize(
    "world_size, layouts",
    [
        (2, [dict(ep=2)]),  # dp=2, edp=1
        (4, [dict(ep=4), dict(tp=2, ep=2), dict(tp=2, ep=4)]),  # dp=4; tp x ep folding; tp=2 with ep over dp
    ],
)
def test_moe_layer_matches_single_process(world_size, layouts, dispatcher):
    results = run_distributed(_moe_body, world_size=world_size, args=(layouts, CASES, dispatcher),
                              timeout_s=TIMEOUT_S)
    rows = [row for rank_rows in results for row in rank_rows]
    for index in range(len(layouts)):
        for case in CASES:
            mine = [row for row in rows if row["layout"] == index and row["case"] == case]
            sent, received = sum(r["sent"] for r in mine), sum(r["received"] for r in mine)
            assert sent == received  # every row sent was received
            assert (sent == 0) == (case == "zero_only"), (layouts[index], case, sent)
            if case == "empty_rank" and dispatcher == "alltoall":  # the all-gather sends every routed token
                assert all(r["received"] == 0 for r in mine if r["last_ep_rank"])


# ----------------------------------------------------------------------------------- whole model


def _model_body(checkpoint_dir):
    import torch.distributed.checkpoint as dcp

    groups = ProcessGroups.build(ParallelDims(dist.get_world_size(), ep=2))
    dp, d = groups.dp_size, groups.dp_rank
    B, S = 2, 6
    ids_all = torch.randint(0, CFG.vocab_size, (dp, B, S), generator=_gen(21))
    gout_all = torch.randn(dp, B, S, CFG.vocab_size, generator=_gen(22))

    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(CFG)
    with torch.no_grad():  # layer 0: uneven routing; layer 1: ep rank 1 receives nothing
        for layer, case in zip(ref.model.layers, ("uneven", "empty_rank")):
            layer.mlp.router.e_score_correction_bias.copy_(_bias(case, dp_rank=0, dp_size=1, ep_size=2))
    model = copy.deepcopy(ref)
    ref_logits = []
    for r in range(dp):
        out = ref(ids_all[r])
        (out.logits_BSV * gout_all[r]).sum().backward()
        ref_logits.append(out.logits_BSV.detach())

    apply_expert_parallel(model, groups=groups)
    info = expert_param_global_info(model, groups)
    params = dict(model.named_parameters())
    projs = ("gate_proj", "up_proj", "down_proj")
    assert set(info) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in projs}
    for name, shard in info.items():
        assert shard.global_shape == tuple(dict(ref.named_parameters())[name].shape)
        assert shard.offset == groups.ep_rank * N // 2 and params[name].shape[0] == N // 2

    out = model(ids_all[d])
    (out.logits_BSV * gout_all[d]).sum().backward()
    torch.testing.assert_close(out.logits_BSV, ref_logits[d], rtol=RTOL, atol=ATOL)
    for name, p in ref.named_parameters():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        got = _global_expert_grad(params[name], groups) if name in info else _dp_sum(params[name].grad, groups)
        # 1e-5 relative to the tensor's scale: fp32 sums run in another order through two layers.
        atol = max(ATOL, RTOL * float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    counters = [layer.mlp.dispatcher.counters() for layer in model.model.layers]
    assert all(c.zero_expert_rows_sent == 0 and c.dispatched_rows > 0 for c in counters)

    # Activation checkpointing recomputes the all-to-alls inside backward, in the same order on all ranks.
    ckpt = copy.deepcopy(ref)
    ckpt.zero_grad()
    ckpt.model.activation_checkpointing = True
    apply_expert_parallel(ckpt, groups=groups)
    out = ckpt(ids_all[d])
    (out.logits_BSV * gout_all[d]).sum().backward()
    for name, p in ckpt.named_parameters():
        assert torch.equal(p.grad, params[name].grad), name
    assert all(layer.mlp.dispatcher.counters().num_dispatches == 2 for layer in ckpt.model.layers)

    # Expert shards as DTensors: DCP saves the global tensors; a plain full-size load gets them back.
    state = {k: expert_shard_to_dtensor(v.detach(), info[k], groups=groups) if k in info else v.detach()
             for k, v in model.state_dict().items()}
    dcp.save(state, checkpoint_id=checkpoint_dir)
    loaded = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    dcp.load(loaded, checkpoint_id=checkpoint_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_model_ep2_matches_single_process_and_saves_global_experts(tmp_path):
    run_distributed(_model_body, world_size=2, args=(str(tmp_path / "ckpt"),), timeout_s=TIMEOUT_S)


# ----------------------------------------------------------------------------------- single process


def test_single_process_groups_leave_the_moe_unchanged():
    groups = ProcessGroups.single()
    moe = _moe()
    ref = copy.deepcopy(moe)
    apply_expert_parallel(moe, groups=groups)
    u = torch.randn(2, 4, CFG.hidden_size, generator=_gen(9))
    assert torch.equal(moe(u)[0], ref(u)[0])
    info = expert_param_global_info(moe, groups)
    assert info["experts.gate_proj"] == ((N, 8, 16), 0)
    # The all-to-all dispatcher on a size-1 ep group is the local one, bit for bit, forward and backward.
    a2a = copy.deepcopy(ref)
    a2a.dispatcher = AllToAllTokenDispatcher(N, ep_group=groups.ep_group)
    u_grads = []
    for m in (ref, a2a):
        u_m = u.clone().requires_grad_()
        out, stats = m(u_m)
        ((out * u).sum() + stats.prob_sum_E.sum()).backward()
        u_grads.append(u_m.grad)
    assert torch.equal(a2a(u)[0], ref(u)[0]) and torch.equal(u_grads[0], u_grads[1])
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a2a.parameters(), ref.parameters()))
    moe.experts.narrow_(expert_offset=2, num_local_experts=2)  # as if sharded already
    with pytest.raises(ValueError, match="already parallelised"):
        apply_expert_parallel(moe, groups=groups)
    with pytest.raises(ValueError, match="cannot narrow"):
        moe.experts.narrow_(expert_offset=0, num_local_experts=1)
