"""Activation checkpointing changes nothing: logits, grads and router statistics are identical."""

from __future__ import annotations

import torch

from longcat.config.schema import ModelConfig
from longcat.model import LongcatFlashForCausalLM

CFG = ModelConfig(
    vocab_size=256, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=6,
    zero_expert_num=3, moe_topk=3, expert_ffn_hidden_size=16, initializer_range=0.1, mtp_num_layers=1,
)


def _run(model, ids, mask):
    out = model(ids, token_mask_BS=mask)
    stats_loss = sum(s.prob_sum_E.square().sum() for s in out.moe_stats)
    loss = out.logits_BSV.square().mean() + out.mtp_logits_BSV.square().mean() + 1e-3 * stats_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


def test_activation_checkpointing_is_exact():
    torch.manual_seed(0)
    plain = LongcatFlashForCausalLM(CFG)
    ckpt = LongcatFlashForCausalLM(CFG, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False

    out_a, grads_a = _run(plain, ids, mask)
    out_b, grads_b = _run(ckpt, ids, mask)
    assert torch.equal(out_a.logits_BSV, out_b.logits_BSV)
    assert torch.equal(out_a.mtp_logits_BSV, out_b.mtp_logits_BSV)
    assert torch.equal(out_a.last_hidden_BSD, out_b.last_hidden_BSD)
    assert len(out_b.moe_stats) == CFG.num_layers  # one per layer, no double count from recompute
    for sa, sb in zip(out_a.moe_stats, out_b.moe_stats):
        for field in ("expert_counts_E", "prob_sum_E", "num_tokens", "ffn_per_token_T"):
            assert torch.equal(getattr(sa, field), getattr(sb, field)), field
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
