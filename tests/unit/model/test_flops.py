"""The model-FLOP formula of longcat.model.flops against a hand count, and a smoke run of one benchmark."""

from __future__ import annotations

import json

import pytest
import torch

from longcat.config.schema import ModelConfig
from longcat.model import count_parameters, flops

# D=8 H=2 Q=4 C=4 A=2 R=2 (K=4) O=2 F=16 N=4 Z=2 top-2 I=4 V=32, one ScMoE layer.
TINY = ModelConfig(
    vocab_size=32, hidden_size=8, num_layers=1, num_attention_heads=2, ffn_hidden_size=16, q_lora_rank=4,
    kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, zero_expert_num=2,
    moe_topk=2, expert_ffn_hidden_size=4,
)
# Weight scalars per token, by hand:
MLA = 8 * 4 + 4 * (2 * 4) + 8 * (4 + 2) + 4 * (2 * (2 + 2)) + (2 * 2) * 8  # q_a, q_b, kv_a, kv_b, o = 176
DENSE = 2 * MLA + 2 * (3 * 8 * 16) + 8 * 6 + 8 * 32  # 2 MLA, 2 SwiGLU FFNs, router (E=6), LM head = 1424
PER_EXPERT = 3 * 8 * 4  # 96
ATTN_PER_BLOCK = lambda B, S: 6 * B * S**2 * 2 * (4 + 2) / 2  # noqa: E731


def test_hand_count():
    f = flops.step_flops(TINY, batch_size=2, seq_len=4, ffn_experts_per_token=1.5)
    assert MLA == 176 and DENSE == 1424
    assert f.matmul_params_per_token == DENSE + 1.5 * PER_EXPERT
    assert f.expert_matmul_flops == 6 * 8 * 1.5 * PER_EXPERT
    assert f.lm_head_flops == 6 * 8 * 8 * 32
    assert f.matmul_flops == 6 * 8 * (DENSE + 1.5 * PER_EXPERT)
    assert f.attention_flops == 2 * ATTN_PER_BLOCK(2, 4) == 2304  # two MLA blocks per ScMoE layer
    assert f.total_flops == f.matmul_flops + f.attention_flops


def test_zero_experts_count_zero_flops():
    only_zero = flops.step_flops(TINY, batch_size=2, seq_len=4, ffn_experts_per_token=0.0)
    all_ffn = flops.step_flops(TINY, batch_size=2, seq_len=4, ffn_experts_per_token=TINY.moe_topk)
    assert only_zero.expert_matmul_flops == 0
    assert only_zero.matmul_params_per_token == DENSE
    assert all_ffn.matmul_flops - only_zero.matmul_flops == 6 * 8 * TINY.moe_topk * PER_EXPERT
    with pytest.raises(ValueError, match="ffn_experts_per_token"):
        flops.step_flops(TINY, batch_size=2, seq_len=4, ffn_experts_per_token=TINY.moe_topk + 0.5)


def test_doubling_sequence_doubles_matmuls_and_quadruples_attention():
    a = flops.step_flops(TINY, batch_size=2, seq_len=8, ffn_experts_per_token=1.0)
    b = flops.step_flops(TINY, batch_size=2, seq_len=16, ffn_experts_per_token=1.0)
    assert b.matmul_flops == 2 * a.matmul_flops
    assert b.attention_flops == 4 * a.attention_flops


def test_matches_count_parameters_and_mtp():
    """P_active = count_parameters' active count minus norm scales (flops.py's convention)."""
    cfg = ModelConfig()  # the tiny preset's dims: 2 layers
    k_e = 2.5
    norms = cfg.num_layers * (4 * cfg.hidden_size + 2 * (cfg.q_lora_rank + cfg.kv_lora_rank)) + cfg.hidden_size
    assert flops.matmul_params_per_token(cfg, ffn_experts_per_token=k_e) == count_parameters(cfg).active_at(k_e) - norms
    # The MTP head adds eh_proj, one MLA, one dense FFN and a second LM-head pass, and one attention block.
    mtp = ModelConfig(mtp_num_layers=1)
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    mla = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
           + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
    extra = flops.matmul_params_per_token(mtp, ffn_experts_per_token=0) - flops.matmul_params_per_token(
        cfg, ffn_experts_per_token=0)
    assert extra == 2 * D * D + mla + 3 * D * cfg.ffn_hidden_size + V * D
    blocks_ratio = 5 / 4  # 2 layers x 2 MLA blocks, + 1
    assert flops.attention_flops(mtp, batch_size=1, seq_len=8) == blocks_ratio * flops.attention_flops(
        cfg, batch_size=1, seq_len=8)


@pytest.mark.parametrize("k_e", [0.0, 1.0, 1.37, 2.0])
def test_gemm_shapes_carry_all_model_flops(k_e):
    gemms = flops.gemm_shapes(TINY, batch_size=2, seq_len=6, ffn_experts_per_token=k_e)
    total = flops.step_flops(TINY, batch_size=2, seq_len=6, ffn_experts_per_token=k_e).total_flops
    assert sum(g.model_flops for g in gemms) == pytest.approx(total, rel=1e-12)
    assert all(g.m >= 1 and g.k >= 1 and g.n >= 1 for g in gemms)


def test_measured_experts_per_token_of_a_real_step():
    """k_e comes from the step's router statistics: with every token forced onto zero experts it is 0."""
    from longcat.bench.training import OursStep, build_ours, make_batch

    model = build_ours(TINY)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias[TINY.n_routed_experts:] = 10.0
    out = OursStep(model, batch=make_batch(TINY, batch_size=2, seq_len=4))()
    assert out.ffn_experts_per_token == 0.0
    assert flops.step_flops(TINY, batch_size=2, seq_len=4, ffn_experts_per_token=0.0).expert_matmul_flops == 0


@pytest.mark.timeout(60)
def test_throughput_benchmark_smoke(tmp_path):
    """One benchmark end to end at tiny settings: ours vs the reference, JSON result, markdown report."""
    pytest.importorskip("transformers")
    from longcat.bench import report, throughput
    from longcat.bench.common import write_result

    settings = throughput.ThroughputSettings(preset="tiny", batch_size=1, seq_len=16, rounds=1, steps_per_round=1)
    result = throughput.run(settings=settings)
    assert result.metrics["losses_match"], result.metrics
    assert result.metrics["ours_tokens_per_s"] > 0 and result.metrics["reference_tokens_per_s"] > 0
    path = write_result(result, tmp_path)
    assert json.loads(path.read_text())["machine"]["torch_version"] == torch.__version__
    (tmp_path / "overlap.json").write_text(json.dumps({"overlap_speedup": 1.25, "nested": {"steps": 3}, "label": "x"}))
    text = report.write_report(tmp_path, tmp_path / "benchmarks.md").read_text()
    assert "Training throughput" in text and "| overlap_speedup | 1.25 |" in text and "| nested.steps | 3 |" in text
