"""Tensor and sequence parallelism (tp=2, gloo) against the single-process model, forward and backward.

Every rank builds the same tiny model from one seed, keeps an untouched copy as the reference, and
shards the other with ``apply_tensor_parallel``; it then checks its own results against the
reference: gathered logits, the vocab-parallel loss, and every parameter's gradient gathered to its
global shape. Rank bodies are module-level functions so that spawn can pickle them.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from longcat.config.schema import ModelConfig
from longcat.distributed import ParallelDims, ProcessGroups, all_gather_along, linear_cross_entropy
from longcat.distributed.tensor_parallel import (
    gather_tp_tensors,
    vocab_parallel_cross_entropy_sum,
)
from longcat.model import LongcatFlashForCausalLM
from longcat.model.parallel.expert_parallel import apply_expert_parallel
from longcat.model.parallel.tensor_parallel import (
    apply_tensor_parallel,
    tp_param_global_info,
)
from longcat.testing import run_distributed
from longcat.train.losses import (
    IGNORE_INDEX,
    cross_entropy_sum,
    hidden_z_loss_sum,
    mtp_labels,
)

TIMEOUT_S = 60
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, mtp_num_layers=1, attention_bias=True,
)
B, S = 2, 6


def _batch(cfg):
    gen = torch.Generator().manual_seed(1)
    input_ids_BS = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    labels_BS = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    labels_BS[0, :2] = IGNORE_INDEX
    token_mask_BS = torch.ones(B, S, dtype=torch.bool)
    token_mask_BS[1, -1] = False
    return input_ids_BS, labels_BS, token_mask_BS


def _loss(out, labels_BS, token_mask_BS, ce):
    """CE + MTP CE + hidden z-loss + a router term: every parameter and output gets a gradient."""
    router = sum(stats.prob_sum_E.square().sum() for stats in out.moe_stats)
    return (ce(out.logits_BSV, labels_BS) + 0.3 * ce(out.mtp_logits_BSV, mtp_labels(labels_BS))
            + 1e-2 * hidden_z_loss_sum(out.last_hidden_BSD, token_mask_BS) + 1e-3 * router)


def _assert_grad_close(actual, expected, name):
    """1e-5 relative to the tensor's largest entry (fp32 sums in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)


def _tp_groups():
    return ProcessGroups.build(ParallelDims(dist.get_world_size(), tp=dist.get_world_size()))


def _parity_body(sequence_parallel, overrides):
    groups = _tp_groups()
    cfg = dataclasses.replace(CFG, **overrides.get("cfg", {}))
    checkpointing = overrides.get("activation_checkpointing", False)
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(cfg, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg, activation_checkpointing=checkpointing)
    apply_tensor_parallel(model, groups=groups, sequence_parallel=sequence_parallel)
    if overrides.get("expert_parallel"):  # the MoE's own tp token split (each rank dispatches 1/tp)
        apply_expert_parallel(model, groups=groups)
    tp_group = groups.tp_group
    input_ids_BS, labels_BS, token_mask_BS = _batch(cfg)

    ref_out = ref(input_ids_BS, token_mask_BS=token_mask_BS)
    ref_loss = _loss(ref_out, labels_BS, token_mask_BS, cross_entropy_sum)
    ref_loss.backward()

    if overrides.get("fused"):  # the fused head + CE (vocab-parallel), no logits: the same loss and grads
        # B x S = 12 tokens < D: the gradients are recomputed in backward unless forced into the forward
        linear_cross_entropy.grads_in_forward = lambda num_tokens, hidden_size: overrides["fused"] == "forward"
        out = model(input_ids_BS, token_mask_BS=token_mask_BS, labels_BS=labels_BS,
                    mtp_labels_BS=mtp_labels(labels_BS))
        assert out.logits_BSV is None and out.mtp_logits_BSV is None
        router = sum(stats.prob_sum_E.square().sum() for stats in out.moe_stats)
        loss = (out.ce_sum + 0.3 * out.mtp_ce_sum + 1e-2 * hidden_z_loss_sum(out.last_hidden_BSD, token_mask_BS)
                + 1e-3 * router)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        loss.backward()
        _check_grads(model, ref, groups, overrides)
        return
    out = model(input_ids_BS, token_mask_BS=token_mask_BS)
    assert out.logits_vocab_parallel and not ref_out.logits_vocab_parallel
    assert out.logits_BSV.shape == (B, S, cfg.vocab_size // 2)
    for local, full in [(out.logits_BSV, ref_out.logits_BSV), (out.mtp_logits_BSV, ref_out.mtp_logits_BSV)]:
        gathered = all_gather_along(local.detach(), dim=-1, group=tp_group)
        torch.testing.assert_close(gathered, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.last_hidden_BSD, ref_out.last_hidden_BSD, rtol=1e-5, atol=1e-6)
    for stats, ref_stats in zip(out.moe_stats, ref_out.moe_stats):
        torch.testing.assert_close(stats.expert_counts_E, ref_stats.expert_counts_E)

    def ce(logits, labels):
        return vocab_parallel_cross_entropy_sum(logits, labels, tp_group=tp_group)

    loss = _loss(out, labels_BS, token_mask_BS, ce)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    loss.backward()
    _check_grads(model, ref, groups, overrides)


def _check_grads(model, ref, groups, overrides):
    """Every parameter's shard and grad against the reference's (after both backwards)."""
    tp_group = groups.tp_group
    info = tp_param_global_info(model, groups)
    named = dict(model.named_parameters())
    assert set(info) == {n for n in named if ".mlp.experts." not in n}
    sharded = {n for n, i in info.items() if i.shard_dim is not None}
    assert "model.layers.0.self_attn.1.kv_b_proj.weight" in sharded and "model.mtp.mlp.down_proj.weight" in sharded
    # The shards reassemble the reference's weights exactly, and their grads its grads.
    params = gather_tp_tensors({n: named[n].detach() for n in info}, info, tp_group=tp_group)
    grads = gather_tp_tensors({n: named[n].grad for n in info}, info, tp_group=tp_group)
    for name in info:
        ref_param = ref.get_parameter(name)
        assert torch.equal(params[name], ref_param.detach()), name
        _assert_grad_close(grads[name], ref_param.grad, name)
    # The documented checkpoint recipe: each shard as a DTensor over the tp mesh is the global tensor.
    tp_mesh = groups.dense_mesh["tp"]
    for name, shard in info.items():
        placement = Replicate() if shard.shard_dim is None else Shard(shard.shard_dim)
        dtensor = DTensor.from_local(named[name].detach(), tp_mesh, [placement], run_check=False)
        assert dtensor.shape == shard.global_shape and torch.equal(dtensor.full_tensor(), params[name]), name
    for name in [n for n in named if n not in info]:  # the experts (same order on every rank)
        grad = named[name].grad.clone()
        if overrides.get("expert_parallel"):
            # Each tp rank ran 1/tp of the tokens through the experts: expert grads are summed over
            # edp (here the tp ranks) by the data-parallel sync ("MoE parallel folding").
            dist.all_reduce(grad, group=groups.edp_group)
        _assert_grad_close(grad, ref.get_parameter(name).grad, name)
    # Replicated params carry identical grads on every tp rank.
    replicated = [n for n, i in info.items() if i.shard_dim is None]
    assert any("layernorm" in n for n in replicated) and any("router" in n for n in replicated)
    flat = torch.cat([named[n].grad.flatten() for n in replicated])
    copies = [torch.empty_like(flat) for _ in range(tp_group.size())]
    dist.all_gather(copies, flat, group=tp_group)
    assert all(torch.equal(c, copies[0]) for c in copies)


@pytest.mark.parametrize(
    "sequence_parallel, overrides",
    [
        (False, {}),
        (True, {"cfg": {"tie_word_embeddings": True}, "activation_checkpointing": True, "expert_parallel": True}),
        (False, {"fused": "forward"}),
        (True, {"cfg": {"tie_word_embeddings": True}, "expert_parallel": True, "fused": "backward"}),
    ],
    ids=["tp", "tp-sp-tied-checkpointed-moe-split", "tp-fused-head-grads-in-forward",
         "tp-sp-tied-fused-head-recompute"],
)
def test_tp_matches_single_process(sequence_parallel, overrides):
    run_distributed(_parity_body, world_size=2, args=(sequence_parallel, overrides), timeout_s=TIMEOUT_S)


def _cross_entropy_body():
    tp_group = _tp_groups().tp_group
    gen = torch.Generator().manual_seed(3)
    logits_BSV = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64) * 4
    labels_BS = torch.randint(0, 16, (3, 5), generator=gen)
    labels_BS[1] = IGNORE_INDEX
    for dtype in (torch.float32, torch.bfloat16):
        full_BSV = logits_BSV.to(dtype).requires_grad_()
        ref = cross_entropy_sum(full_BSV, labels_BS)
        ref.backward()
        local_BSV = full_BSV.detach().chunk(2, dim=-1)[tp_group.rank()].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy_sum(local_BSV, labels_BS, tp_group=tp_group)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        (2.0 * loss).backward()
        expected = 2.0 * full_BSV.grad.chunk(2, dim=-1)[tp_group.rank()]
        torch.testing.assert_close(local_BSV.grad, expected, rtol=1e-5, atol=1e-6)
    # All labels ignored: zero loss, zero grads.
    local_BSV = torch.randn(2, 3, 8, requires_grad=True)
    loss = vocab_parallel_cross_entropy_sum(local_BSV, torch.full((2, 3), IGNORE_INDEX), tp_group=tp_group)
    loss.backward()
    assert loss.item() == 0 and not local_BSV.grad.any()


def test_vocab_parallel_cross_entropy_equals_full():
    run_distributed(_cross_entropy_body, world_size=2, timeout_s=TIMEOUT_S)


def _errors_body():
    groups = _tp_groups()
    for field, value in [("num_attention_heads", 3), ("vocab_size", 63), ("ffn_hidden_size", 33)]:
        model = LongcatFlashForCausalLM(dataclasses.replace(CFG, **{field: value}))
        with pytest.raises(ValueError, match=f"model.{field}={value} is not divisible by tp=2"):
            apply_tensor_parallel(model, groups=groups, sequence_parallel=False)
    model = LongcatFlashForCausalLM(CFG)
    apply_tensor_parallel(model, groups=groups, sequence_parallel=True)
    with pytest.raises(ValueError, match="already applied"):
        apply_tensor_parallel(model, groups=groups, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"sequence S=5 over tp=2"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_invalid_tensor_parallel_raises():
    run_distributed(_errors_body, world_size=2, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp1_is_single_process_math(sequence_parallel):
    """A size-1 tp group (one process, no torch.distributed) gives bit-identical outputs and grads."""
    groups = ProcessGroups.single()
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(CFG)
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(CFG)
    apply_tensor_parallel(model, groups=groups, sequence_parallel=sequence_parallel)
    input_ids_BS, labels_BS, token_mask_BS = _batch(CFG)
    ref_out, out = ref(input_ids_BS, token_mask_BS=token_mask_BS), model(input_ids_BS, token_mask_BS=token_mask_BS)
    assert torch.equal(out.logits_BSV, ref_out.logits_BSV)
    _loss(ref_out, labels_BS, token_mask_BS, cross_entropy_sum).backward()
    _loss(out, labels_BS, token_mask_BS, cross_entropy_sum).backward()
    info = tp_param_global_info(model, groups)
    for name, param in model.named_parameters():
        assert info.get(name, (param.shape,))[0] == param.shape
        assert torch.equal(param.grad, ref.get_parameter(name).grad), name
