"""Parity with HF transformers' LongcatFlashForCausalLM (the reference implementation), fp32 CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longcat.config.schema import ModelConfig
from longcat.interop import to_transformers_state_dict, transformers_layout
from longcat.model import LongcatFlashForCausalLM
from longcat.model.hf_mapping import (
    HFLayout,
    from_hf_state_dict,
    hf_config_dict,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

BASE = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    zero_expert_num=4, moe_topk=4, expert_ffn_hidden_size=32, routed_scaling_factor=2.0, rope_theta=10000.0,
    initializer_range=0.08,  # larger than default so routing and attention are far from uniform
)


def _build_pair(cfg: ModelConfig, *, bias_fn=None, attn_implementation: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    ours = LongcatFlashForCausalLM(cfg)
    if bias_fn is not None:
        with torch.no_grad():
            for layer in ours.model.layers:
                layer.mlp.router.e_score_correction_bias.copy_(bias_fn(cfg))
    hf_cfg = transformers.LongcatFlashConfig(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = attn_implementation
    hf = transformers.LongcatFlashForCausalLM(hf_cfg)
    hf.load_state_dict(to_transformers_state_dict(ours.state_dict(), cfg=cfg), strict=True)
    return ours, hf


def _zero_experts_only(cfg):
    return torch.cat([torch.zeros(cfg.n_routed_experts), torch.full((cfg.zero_expert_num,), 10.0)])


def _starve_expert_3(cfg):
    bias = torch.zeros(cfg.num_experts_total)
    bias[3] = -1e4
    return bias


def _random_bias(cfg):
    return torch.randn(cfg.num_experts_total, generator=torch.Generator().manual_seed(7)) * 0.05


CASES = {
    "zero_experts": (BASE, None),
    "no_zero_experts": (dataclasses.replace(BASE, zero_expert_num=0), None),
    "all_to_zero_experts": (BASE, _zero_experts_only),
    "empty_expert": (BASE, _starve_expert_3),
    "nonzero_bias": (BASE, _random_bias),
    "attention_bias_tied_mtp": (
        dataclasses.replace(BASE, attention_bias=True, tie_word_embeddings=True, mtp_num_layers=1, moe_topk=2),
        _random_bias,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case):
    cfg, bias_fn = CASES[case]
    ours, hf = _build_pair(cfg, bias_fn=bias_fn)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours(ids)
        ref = hf(ids).logits
    assert ref.std() > 0.05  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(out.logits_BSV, ref, atol=1e-5, rtol=1e-5)

    counts_E = out.moe_stats[0].expert_counts_E
    if case == "all_to_zero_experts":
        assert counts_E[: cfg.n_routed_experts].sum() == 0
    if case == "empty_expert":
        assert counts_E[3] == 0 and counts_E[: cfg.n_routed_experts].sum() > 0


def test_gradients_and_sdpa_and_positions_match_hf():
    cfg, bias_fn = CASES["nonzero_bias"]
    ours, hf = _build_pair(cfg, bias_fn=bias_fn, attn_implementation="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(5, 21).expand(2, 16)
    ours(ids, position_ids_BS=positions).logits_BSV.square().mean().backward()
    hf(ids, position_ids=positions).logits.square().mean().backward()

    ours_grads = {k: v for k, v in ours.named_parameters()}
    ours_grads = to_hf_state_dict({k: p.grad for k, p in ours_grads.items()}, cfg=cfg, include_mtp=False,
                                  packed_experts=transformers_layout(cfg).packed_experts)
    for name, param in hf.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout,packed_experts", [(HFLayout.PACKED, None), (HFLayout.PACKED, 12),
                                                    (HFLayout.PER_EXPERT, None), (HFLayout.PER_EXPERT_PADDED, None)])
def test_hf_state_dict_round_trip(layout, packed_experts):
    cfg = dataclasses.replace(BASE, mtp_num_layers=1)
    torch.manual_seed(0)
    sd = LongcatFlashForCausalLM(cfg).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg=cfg, layout=layout, packed_experts=packed_experts)
    if layout == HFLayout.PACKED:  # transformers 5.25 packs N rows, 5.0 packed N+Z (zero beyond N)
        gate_up = hf_sd["model.layers.0.mlp.experts.gate_up_proj"]
        rows = packed_experts or cfg.n_routed_experts
        assert gate_up.shape == (rows, 2 * cfg.expert_ffn_hidden_size, cfg.hidden_size)
        assert not gate_up[cfg.n_routed_experts :].any()
        assert torch.equal(gate_up[2, : cfg.expert_ffn_hidden_size], sd["model.layers.0.mlp.experts.gate_proj"][2])
    else:
        down_5 = hf_sd["model.layers.1.mlp.experts.5.down_proj.weight"]
        assert torch.equal(down_5, sd["model.layers.1.mlp.experts.down_proj"][5])
    assert "model.mtp.layers.0.enorm.m.weight" in hf_sd and "model.mtp.embed_tokens.weight" in hf_sd
    back = from_hf_state_dict(hf_sd, cfg=cfg)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
