"""Context parallelism (cp=2, gloo) against the single-process model, forward and backward.

Every rank builds the same tiny model from one seed, keeps an untouched copy as the reference (run on
the whole sequence) and applies the CP plan to the other, which runs on this rank's load-balanced
half of the sequence (``cp_split``). Each rank checks the reassembled outputs, its own input grads,
and every parameter's grad after the sum over cp that the trainer will do. Rank bodies are
module-level functions so that spawn can pickle them.
"""

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from longcat.config.schema import ModelConfig
from longcat.distributed import all_reduce_sum
from longcat.distributed.context_parallel import (
    cp_all_gather_sequence,
    cp_local_positions,
    cp_split,
)
from longcat.model import LongcatFlashForCausalLM
from longcat.model.attention import ExpandedKV, MultiHeadLatentAttention
from longcat.model.parallel.context_parallel import apply_context_parallel
from longcat.model.rope import RotaryEmbedding
from longcat.testing import run_distributed
from longcat.train.losses import IGNORE_INDEX, cross_entropy_sum, hidden_z_loss_sum, mtp_labels

TIMEOUT_S = 90
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=32, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=16, mtp_num_layers=1,
)


def _assert_grad_close(actual, expected, name):
    """1e-5 relative to the tensor's largest entry (fp32 sums in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)


def _cp():
    group = dist.group.WORLD
    return group, group.rank(), group.size()


def _gather_global(local_BN, group):
    """[B, N, *] local rows -> [B, S, *] in global order (no grad)."""
    return cp_all_gather_sequence(local_BN.detach().contiguous(), seq_dim=1, cp_group=group)


def _sum_param_grads_over_cp(module, group):
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)


# ----------------------------------------------------------------------------- (a) one MLA block


def _mla_body(cases):
    group, rank, cp = _cp()
    for seed, B, S, attention_bias, expanded_kv in cases:
        cfg = dataclasses.replace(CFG, attention_bias=attention_bias)
        torch.manual_seed(seed)
        ref = MultiHeadLatentAttention(cfg)
        for param in ref.parameters():  # the default init leaves biases at 0 and kv_b_proj small
            torch.nn.init.normal_(param, std=0.3)
        mla = copy.deepcopy(ref)
        mla.cp_group, mla.cp_expanded_kv = group, expanded_kv
        gen = torch.Generator().manual_seed(seed + 1)
        x_BSD = torch.randn(B, S, cfg.hidden_size, generator=gen, requires_grad=True)
        g_BSD = torch.randn(B, S, cfg.hidden_size, generator=gen)
        rope = RotaryEmbedding(cfg.qk_rope_head_dim, theta=1e4)
        cos_1SP, sin_1SP = rope(None, seq_len=S, device=torch.device("cpu"), dtype=torch.float32)

        out_BSD = ref(x_BSD, cos_BSP=cos_1SP, sin_BSP=sin_1SP)
        (out_BSD * g_BSD).sum().backward()

        x_BND = cp_split(x_BSD.detach(), cp_rank=rank, cp=cp).requires_grad_()
        cos_1NP, sin_1NP = rope(cp_local_positions(S, cp_rank=rank, cp=cp)[None], seq_len=S // cp,
                                device=torch.device("cpu"), dtype=torch.float32)
        out_BND = mla(x_BND, cos_BSP=cos_1NP, sin_BSP=sin_1NP)
        assert out_BND.shape == (B, S // cp, cfg.hidden_size)
        (out_BND * cp_split(g_BSD, cp_rank=rank, cp=cp)).sum().backward()

        case = f"seed={seed} B={B} S={S} {expanded_kv}"
        torch.testing.assert_close(_gather_global(out_BND, group), out_BSD.detach(), rtol=1e-5, atol=1e-6, msg=case)
        _assert_grad_close(x_BND.grad, cp_split(x_BSD.grad, cp_rank=rank, cp=cp), f"x grad {case}")
        _sum_param_grads_over_cp(mla, group)
        for name, param in mla.named_parameters():
            _assert_grad_close(param.grad, ref.get_parameter(name).grad, f"{name} {case}")
        with torch.no_grad():  # the inference path (no recompute) gives the same output
            torch.testing.assert_close(mla(x_BND, cos_BSP=cos_1NP, sin_BSP=sin_1NP), out_BND.detach(),
                                       rtol=1e-6, atol=1e-7)


def test_mla_cp2_matches_single_process():
    recompute, keep = ExpandedKV.RECOMPUTE, ExpandedKV.KEEP
    cases = [(0, 1, 8, False, recompute), (1, 2, 12, True, keep), (2, 3, 4, False, recompute),  # S=4: L=1
             (3, 2, 32, True, recompute), (4, 1, 16, False, keep)]
    run_distributed(_mla_body, world_size=2, args=(cases,), timeout_s=TIMEOUT_S)


def _mla_bf16_body():
    """Under bf16 autocast (train.bf16) the cp path attends in bf16 as the single-device path does."""
    group, rank, cp = _cp()
    torch.manual_seed(5)
    ref = MultiHeadLatentAttention(CFG)
    for param in ref.parameters():
        torch.nn.init.normal_(param, std=0.3)
    mla = copy.deepcopy(ref)
    mla.cp_group = group
    B, S = 2, 16
    gen = torch.Generator().manual_seed(6)
    x_BSD = torch.randn(B, S, CFG.hidden_size, generator=gen)
    rope = RotaryEmbedding(CFG.qk_rope_head_dim, theta=1e4)
    cos_1SP, sin_1SP = rope(None, seq_len=S, device=torch.device("cpu"), dtype=torch.float32)
    cos_1NP, sin_1NP = rope(cp_local_positions(S, cp_rank=rank, cp=cp)[None], seq_len=S // cp,
                            device=torch.device("cpu"), dtype=torch.float32)
    x_BND = cp_split(x_BSD, cp_rank=rank, cp=cp).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_BSD = ref(x_BSD, cos_BSP=cos_1SP, sin_BSP=sin_1SP)
        out_BND = mla(x_BND, cos_BSP=cos_1NP, sin_BSP=sin_1NP)
    assert out_BND.dtype == out_BSD.dtype == torch.bfloat16
    out_BND.float().sum().backward()  # the recompute in backward runs under the same autocast state
    assert x_BND.grad is not None and torch.isfinite(x_BND.grad).all()
    got, want = _gather_global(out_BND, group).float(), out_BSD.detach().float()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_mla_cp2_under_bf16_autocast():
    run_distributed(_mla_bf16_body, world_size=2, timeout_s=TIMEOUT_S)


# ----------------------------------------------------------------------------- (b) the whole model


def _batch(B, S, vocab_size):
    gen = torch.Generator().manual_seed(1)
    input_ids_BS = torch.randint(0, vocab_size, (B, S), generator=gen)
    labels_BS = torch.randint(0, vocab_size, (B, S), generator=gen)
    labels_BS[0, :3] = IGNORE_INDEX
    token_mask_BS = torch.ones(B, S, dtype=torch.bool)
    token_mask_BS[-1, -2:] = False  # right padding, in rank 0's last chunk
    return input_ids_BS, labels_BS, token_mask_BS


def _token_loss(out, labels_BS, mtp_labels_BS, token_mask_BS):
    """Sums over tokens: CE + MTP CE + hidden z-loss."""
    return (cross_entropy_sum(out.logits_BSV, labels_BS) + 0.3 * cross_entropy_sum(out.mtp_logits_BSV, mtp_labels_BS)
            + 1e-2 * hidden_z_loss_sum(out.last_hidden_BSD, token_mask_BS))


def _router_term(prob_sums_E):
    """A non-linear function of the router's probability sums, like the load-balance loss."""
    return 1e-3 * sum(p.square().sum() for p in prob_sums_E)


def _model_body(options):
    group, rank, cp = _cp()
    B, S = options["B"], options["S"]
    checkpointing = options.get("activation_checkpointing", False)
    torch.manual_seed(0)
    ref = LongcatFlashForCausalLM(CFG, activation_checkpointing=checkpointing)
    model = apply_context_parallel(copy.deepcopy(ref), cp_group=group, expanded_kv=options.get("expanded_kv"))
    input_ids_BS, labels_BS, token_mask_BS = _batch(B, S, CFG.vocab_size)
    position_ids_BS = options.get("position_offset")
    if position_ids_BS is not None:
        position_ids_BS = torch.arange(S).expand(B, S) + torch.tensor(position_ids_BS)[:, None]
    mtp_labels_BS = mtp_labels(labels_BS)  # shifted on the global sequence, then split

    ref_out = ref(input_ids_BS, token_mask_BS=token_mask_BS, position_ids_BS=position_ids_BS)
    ref_loss = (_token_loss(ref_out, labels_BS, mtp_labels_BS, token_mask_BS)
                + _router_term([s.prob_sum_E for s in ref_out.moe_stats]))
    ref_loss.backward()

    def split(x):
        return None if x is None else cp_split(x, cp_rank=rank, cp=cp)

    local_mask_BN = split(token_mask_BS)
    out = model(split(input_ids_BS), token_mask_BS=local_mask_BN, position_ids_BS=split(position_ids_BS))
    assert out.logits_BSV.shape == (B, S // cp, CFG.vocab_size)
    for local, full in [(out.logits_BSV, ref_out.logits_BSV), (out.mtp_logits_BSV, ref_out.mtp_logits_BSV),
                        (out.last_hidden_BSD, ref_out.last_hidden_BSD)]:
        torch.testing.assert_close(_gather_global(local, group), full.detach(), rtol=1e-5, atol=1e-6)
    # Router statistics are local: summed over cp they are the single-process ones.
    for stats, ref_stats in zip(out.moe_stats, ref_out.moe_stats):
        counts_E = stats.expert_counts_E.clone()
        dist.all_reduce(counts_E, group=group)
        torch.testing.assert_close(counts_E, ref_stats.expert_counts_E)

    token_loss = _token_loss(out, split(labels_BS), split(mtp_labels_BS), local_mask_BN)
    # [E] local prob sums -> all_reduce(cp) -> [E] global; backward: identity, so each rank's router
    # term sends d(term)/dP to its own tokens and the cp sum of param grads is the full gradient.
    router = _router_term([all_reduce_sum(s.prob_sum_E, group=group) for s in out.moe_stats])
    (token_loss + router).backward()
    total = token_loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total + router.detach(), ref_loss.detach(), rtol=1e-5, atol=0)

    _sum_param_grads_over_cp(model, group)
    for name, param in model.named_parameters():
        _assert_grad_close(param.grad, ref.get_parameter(name).grad, name)


@pytest.mark.parametrize(
    "options",
    [
        {"B": 2, "S": 8},
        {"B": 1, "S": 8, "activation_checkpointing": True},  # CP's own recompute nested in the layer's
        {"B": 1, "S": 16, "position_offset": [5], "activation_checkpointing": True, "expanded_kv": "keep"},
    ],
    ids=["B2-S8", "B1-S8-checkpointed-recompute", "B1-S16-positions-checkpointed-keep"],
)
def test_model_cp2_matches_single_process(options):
    run_distributed(_model_body, world_size=2, args=(options,), timeout_s=TIMEOUT_S)


# ----------------------------------------------------------------------------- (c) bad inputs


def _errors_body():
    group, rank, cp = _cp()
    model = apply_context_parallel(LongcatFlashForCausalLM(CFG), cp_group=group)
    with pytest.raises(ValueError, match=r"S=6 is not divisible by 2\*cp=4 \(cp=2\)"):
        cp_split(torch.zeros(1, 6, dtype=torch.long), cp_rank=rank, cp=cp)
    # 3 local tokens per rank: a global S of 6 (the model checks before any collective).
    with pytest.raises(ValueError, match=r"S=6 is not divisible by 2\*cp=4"):
        model(torch.zeros(1, 3, dtype=torch.long))
    mla = model.model.layers[0].self_attn[0]
    cos_1NP = torch.ones(1, 3, CFG.qk_rope_head_dim // 2)
    with pytest.raises(ValueError, match="3 local tokens is odd"):
        mla(torch.zeros(1, 3, CFG.hidden_size), cos_BSP=cos_1NP, sin_BSP=cos_1NP)
    dist.barrier(group=group)  # both ranks raised before entering any collective


def test_cp_bad_inputs_raise():
    run_distributed(_errors_body, world_size=2, timeout_s=TIMEOUT_S)
