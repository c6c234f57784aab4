"""The ScMoE overlap: the schedule changes when the expert-parallel exchanges run, never the numbers.

Distributed (gloo, ep=2 on 2 ranks, a tiny 2-layer ``LongcatFlashForCausalLM``): forward + backward
of the whole model with overlap off / on and 1 / 2 chunks (and activation checkpointing) give
bit-identical losses, logits and gradients; 2 chunks split by token (the paper's split) agree to
rounding and are bit-identical across schedules; the all-gather dispatcher is bit-identical with overlap
on and off; the forward and the backward really put the dense
branch between each exchange's launch and its wait; the wait recorder books every wait.
Single process: the chunked dispatcher on a size-1 group equals the local one bit for bit.

Bit-identity across chunk counts needs every expert row to be computed the same wherever it sits in
the tensor: on CPU, ATen's vectorised element-wise loops (silu) use scalar code for a tail shorter
than two vectors, which rounds differently; hence an expert FFN width that is a multiple of 32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups, overlap
from longcat.model import LongcatFlashForCausalLM, MoE
from longcat.model.moe import TokenDispatcher
from longcat.model.moe.dispatch import (
    AllGatherTokenDispatcher,
    ChunkedAllToAllTokenDispatcher,
    TokenChunkedTokenDispatcher,
)
from longcat.model.parallel.expert_parallel import (
    apply_expert_parallel,
    apply_moe_overlap,
)
from longcat.testing import run_distributed

TIMEOUT_S = 80
N, Z, K = 4, 3, 3  # ep=2: L=2 local experts per rank, so 2 chunks of one expert each
# expert_ffn_hidden_size=32: a row of the expert activation is whole vector blocks (see above)
CFG = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32, q_lora_rank=8,
    kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=N,
    zero_expert_num=Z, moe_topk=K, expert_ffn_hidden_size=32, initializer_range=0.2,
)
SCHEDULES = [  # (overlap_moe_comm, moe_chunks, activation_checkpointing); the first is the reference
    (False, 1, False),
    (True, 1, False),
    (True, 2, False),
    (False, 2, False),
    (True, 2, True),
]
# Token chunks (the paper's split): each chunk's grouped GEMM has fewer rows, and a GEMM kernel's row
# depends on the row count on CPU, so they agree with no chunks to rounding (see ``token_chunked``);
# among themselves the schedule never changes the bits.
TOKEN_SCHEDULES = [(True, 2, False), (False, 2, False), (True, 2, True)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference_model():
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(CFG)
    with torch.no_grad():
        layer0, layer1 = (layer.mlp.router.e_score_correction_bias for layer in model.model.layers)
        layer0.copy_(0.05 * torch.randn(N + Z, generator=_gen(11)))
        layer0[0] += 0.3  # uneven
        layer1.copy_(layer0)
        layer1[3] = -10.0  # expert 3 unused: ep rank 1's second chunk receives nothing
    return model


def _batch(rank):
    B, S = 2, 6
    ids_BS = torch.randint(0, CFG.vocab_size, (2, B, S), generator=_gen(21))[rank]
    labels_BS = torch.randint(0, CFG.vocab_size, (2, B, S), generator=_gen(22))[rank]
    w_E = torch.randn(N + Z, generator=_gen(23))
    mask_BS = torch.ones(B, S, dtype=torch.bool)
    mask_BS[1, -2:] = False  # right padding on the second row
    return ids_BS, labels_BS, w_E, mask_BS


def _train_step(model, groups, *, overlap_on, chunks, checkpointing, recorder=None, chunk_dim="expert",
                dispatcher="alltoall"):
    """One forward + backward of ``model`` (parallelised here, in place) on this dp rank's batch."""
    model.model.activation_checkpointing = checkpointing
    apply_expert_parallel(model, groups=groups, dispatcher=dispatcher)
    apply_moe_overlap(model, overlap=overlap_on, num_chunks=chunks, chunk_dim=chunk_dim)
    ids_BS, labels_BS, w_E, mask_BS = _batch(groups.dp_rank)
    recorder = overlap.CommWaitRecorder() if recorder is None else recorder
    with overlap.record_comm_waits(recorder):
        out = model(ids_BS, token_mask_BS=mask_BS)
        loss = F.cross_entropy(out.logits_BSV.flatten(0, 1), labels_BS.flatten())
        loss = loss + sum((stats.prob_sum_E * w_E).sum() for stats in out.moe_stats)
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.detach(), out.logits_BSV.detach(), grads, recorder.totals()


def _check_bits_identical(groups):
    ref = _reference_model()
    results = [
        _train_step(copy.deepcopy(ref), groups, overlap_on=o, chunks=c, checkpointing=ckpt) for o, c, ckpt in SCHEDULES
    ]
    want_loss, want_logits, want_grads, _ = results[0]
    assert all(g is not None for g in want_grads.values())
    for schedule, (loss, logits, grads, _) in zip(SCHEDULES[1:], results[1:]):
        assert torch.equal(loss, want_loss), (schedule, loss, want_loss)
        assert torch.equal(logits, want_logits), schedule
        for name, want in want_grads.items():
            assert torch.equal(grads[name], want), (schedule, name)
    # Token chunks: agree with no chunks to rounding; overlap and recomputation change no bits.
    token_results = [
        _train_step(copy.deepcopy(ref), groups, overlap_on=o, chunks=c, checkpointing=ckpt, chunk_dim="token")
        for o, c, ckpt in TOKEN_SCHEDULES
    ]
    loss, logits, grads, _ = token_results[0]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
    for loss, logits, grads, _ in token_results[1:]:  # the schedule never changes the bits
        assert torch.equal(loss, token_results[0][0]) and torch.equal(logits, token_results[0][1])
        assert all(torch.equal(grads[name], token_results[0][2][name]) for name in grads)
    # The all-gather dispatcher: overlap on / off give the same bits, and agree with the all-to-all.
    gather_results = [_train_step(copy.deepcopy(ref), groups, overlap_on=o, chunks=1, checkpointing=False,
                                  dispatcher="allgather") for o in (False, True)]
    (loss0, logits0, grads0, _), (loss1, logits1, grads1, _) = gather_results
    assert torch.equal(loss0, loss1) and torch.equal(logits0, logits1)
    assert all(torch.equal(grads0[name], grads1[name]) for name in grads0)
    torch.testing.assert_close(logits0, want_logits, rtol=1e-5, atol=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads0[name], want, rtol=1e-5, atol=1e-6, msg=name)
    # Every exchange's wait is booked, forward and backward: layers x chunks of each kind.
    for (_, chunks, ckpt), (_, _, _, totals) in zip(SCHEDULES + TOKEN_SCHEDULES, results + token_results):
        expected = CFG.num_layers * chunks
        forward = expected * (2 if ckpt else 1)  # recomputation repeats the forward's exchanges
        assert totals["dispatch.forward"].num_waits == totals["combine.forward"].num_waits == forward, totals
        assert totals["dispatch.backward"].num_waits == totals["combine.backward"].num_waits == expected, totals
        assert all(t.blocked_s >= 0.0 for t in totals.values())


def _dense_steps(model):
    """The last layer's dense steps that run under its exchanges."""
    layer = model.model.layers[-1]
    return {"ffn0": layer.mlps[0], "attn1": layer.self_attn[1], "ffn1": layer.mlps[1]}


def _logged_schedule(groups, *, overlap_on):
    """The order of exchange launches / waits and dense forward / backward steps in one train step."""
    log = []
    model = _reference_model()
    steps = _dense_steps(model)

    def watch(name):
        def hook(_module, _args, output):
            log.append(("forward", name))

        return hook

    for name, module in steps.items():
        module.register_forward_hook(watch(name))
        for pname, param in module.named_parameters():  # a weight's grad is complete: its backward ran
            param.register_post_accumulate_grad_hook(lambda _p, key=f"{name}.{pname}": log.append(("grad", key)))
    launch, wait = overlap.launch, overlap.InFlight.wait

    def logged_launch(collective, *, key, **kwargs):
        log.append(("launch", key))
        return launch(collective, key=key, **kwargs)

    def logged_wait(self):
        log.append(("wait", self.key))
        return wait(self)

    overlap.launch, overlap.InFlight.wait = logged_launch, logged_wait
    try:
        _train_step(model, groups, overlap_on=overlap_on, chunks=1, checkpointing=False)
    finally:
        overlap.launch, overlap.InFlight.wait = launch, wait
    return log


def _between(log, key, *, last):
    """The dense events between the launch of the (last/first) exchange ``key`` and its wait."""
    launches = [i for i, event in enumerate(log) if event == ("launch", key)]
    start = launches[-1] if last else launches[0]
    end = log.index(("wait", key), start)
    return [event for event in log[start + 1 : end] if event[0] not in ("launch", "wait")]


def _check_schedule(groups):
    log = _logged_schedule(groups, overlap_on=True)
    # Forward (the last layer's exchanges are the last forward ones): dense work under each exchange.
    assert _between(log, "dispatch.forward", last=True) == [("forward", "ffn0"), ("forward", "attn1")]
    assert _between(log, "combine.forward", last=True) == [("forward", "ffn1")]
    # Backward (the last layer's exchanges come first): the dense branch's backward under each one.
    def grads_under(key):
        return {event[1].split(".")[0] for event in _between(log, key, last=False) if event[0] == "grad"}

    params = {name: len(list(module.parameters())) for name, module in _dense_steps(_reference_model()).items()}
    under_combine = [e for e in _between(log, "combine.backward", last=False) if e[0] == "grad"]
    assert len(under_combine) == params["ffn1"] and grads_under("combine.backward") == {"ffn1"}, under_combine
    under_dispatch = [e for e in _between(log, "dispatch.backward", last=False) if e[0] == "grad"]
    assert len(under_dispatch) == params["ffn0"] + params["attn1"], under_dispatch
    assert grads_under("dispatch.backward") == {"ffn0", "attn1"}, under_dispatch
    # Without overlap every exchange is waited for at once.
    log = _logged_schedule(groups, overlap_on=False)
    for key in ("dispatch.forward", "combine.forward", "combine.backward", "dispatch.backward"):
        assert _between(log, key, last=False) == [] and _between(log, key, last=True) == [], key


def _overlap_body():
    groups = ProcessGroups.build(ParallelDims(dist.get_world_size(), ep=2))
    _check_bits_identical(groups)
    _check_schedule(groups)


def test_overlap_and_chunks_are_bit_identical_and_really_overlap():
    run_distributed(_overlap_body, world_size=2, timeout_s=TIMEOUT_S)


def test_chunked_dispatcher_on_one_rank_matches_local_and_validates():
    groups = ProcessGroups.single()
    torch.manual_seed(0)
    local = MoE(CFG)
    with torch.no_grad():
        for p in local.parameters():
            p.normal_(0.0, 0.3)
    chunked = copy.deepcopy(local)
    chunked.dispatcher = ChunkedAllToAllTokenDispatcher(N, ep_group=groups.ep_group, num_chunks=2)
    u_BSD = torch.randn(2, 5, CFG.hidden_size, generator=_gen(3))
    results = []
    for moe in (local, chunked):
        u = u_BSD.clone().requires_grad_()
        out, stats = moe(u)
        ((out * u_BSD).sum() + stats.prob_sum_E.sum()).backward()
        results.append((out, u.grad, [p.grad for p in moe.parameters()]))
    (out0, du0, g0), (out1, du1, g1) = results
    assert torch.equal(out0, out1) and torch.equal(du0, du1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    # Its unpipelined API (every chunk waited, the experts run once over all rows) agrees too.
    with torch.no_grad():
        state = chunked.start(u_BSD)
        state.pending = TokenDispatcher.run_experts(chunked.dispatcher, state.pending, experts=chunked.experts)
        assert torch.equal(chunked.finish(state)[0], out0)
    with pytest.raises(ValueError, match="first_expert=3"):
        chunked.experts(u_BSD[0], counts_L=torch.tensor([3, 2]), first_expert=3)
    with pytest.raises(ValueError, match="moe_chunks=3 must be >= 1 and divide the 4 local experts"):
        ChunkedAllToAllTokenDispatcher(N, ep_group=groups.ep_group, num_chunks=3)
    with pytest.raises(ValueError, match="moe_chunks=0 must be >= 1"):
        apply_moe_overlap(chunked, overlap=True, num_chunks=0)


def test_allgather_and_token_chunks_on_one_rank_match_local():
    """On a size-1 group the all-gather dispatcher is the local one bit for bit (every slot is local, the
    rank-order sum has one term); token chunks agree to rounding, and their unpipelined API (all chunks
    waited, one GEMM over the rows sorted by local expert) to rounding as well."""
    groups = ProcessGroups.single()
    torch.manual_seed(0)
    local = MoE(CFG)
    with torch.no_grad():
        for p in local.parameters():
            p.normal_(0.0, 0.3)
    gather, token = copy.deepcopy(local), copy.deepcopy(local)
    gather.dispatcher = AllGatherTokenDispatcher(N, ep_group=groups.ep_group)
    token.dispatcher = TokenChunkedTokenDispatcher(N, ep_group=groups.ep_group, num_chunks=3)  # 10 tokens: 4+3+3
    u_BSD = torch.randn(2, 5, CFG.hidden_size, generator=_gen(3))
    results = []
    for moe in (local, gather, token):
        u = u_BSD.clone().requires_grad_()
        out, stats = moe(u)
        ((out * u_BSD).sum() + stats.prob_sum_E.sum()).backward()
        results.append((out, u.grad, [p.grad for p in moe.parameters()]))
    (out0, du0, g0), (out1, du1, g1), (out2, du2, g2) = results
    assert torch.equal(out0, out1) and torch.equal(du0, du1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    torch.testing.assert_close(out2, out0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du2, du0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert token.dispatcher.counters().num_dispatches == 1 and gather.dispatcher.counters().zero_expert_rows_sent == 0
    with torch.no_grad():
        state = token.start(u_BSD)
        state.pending = TokenDispatcher.run_experts(token.dispatcher, state.pending, experts=token.experts)
        torch.testing.assert_close(token.finish(state)[0], out0, rtol=1e-5, atol=1e-6)
