"""The context-parallel benchmark: its exchange formulas at LongCat-Flash's dims, and a quick run."""

import json

import pytest

from longcat.bench.common import load_preset
from longcat.bench.context_parallel import SCHEMES, ContextParallelBenchSettings, exchange_costs, main


def test_longcat_flash_exchange_costs_by_hand():
    cfg = load_preset("longcat_flash")
    S, cp = 131072, 8
    latent, kept, gathered, ring = exchange_costs(cfg, seq_len=S, cp=cp, bytes_per_value=2)
    assert [c.scheme for c in (latent, kept, gathered, ring)] == list(SCHEMES)
    assert (latent.values_per_token, gathered.values_per_token) == (512 + 64, 64 * (192 + 128))
    assert latent.forward_bytes == 7 * (S // 8) * 576 * 2 == latent.backward_bytes  # 126 MiB
    assert gathered.forward_bytes == 7 * (S // 8) * 20480 * 2 == gathered.backward_bytes
    assert ring.forward_bytes == gathered.forward_bytes and ring.backward_bytes == 2 * ring.forward_bytes
    assert gathered.forward_bytes / latent.forward_bytes == pytest.approx(20480 / 576)
    kv_b = 512 * 64 * 256  # kv_b_proj weight scalars
    # Busiest rank (0) expands all S keys: forward + recompute + backward = 8 FLOPs per scalar and key,
    # against 6 for its own S/cp keys on a single device.
    assert latent.extra_kv_b_flops_max == 8 * S * kv_b - 6 * (S // 8) * kv_b
    assert kept.extra_kv_b_flops_max == 6 * S * kv_b - 6 * (S // 8) * kv_b
    assert gathered.extra_kv_b_flops_max == ring.extra_kv_b_flops_max == 0
    assert latent.attention_flops == 6 * S * S * 64 * 320 / 2 / 8
    assert 0.05 < latent.extra_kv_b_flops_max / latent.attention_flops < 0.07  # ~6% at 128k
    assert latent.held_kv_bytes == S * 576 * 2 and ring.held_kv_bytes == (S // 8) * 20480 * 2
    # For scale: a decoder layer per rank (its matmuls over S/cp tokens with 8 FFN experts, 2 blocks' attention).
    short = exchange_costs(cfg, seq_len=32768, cp=cp)[0]
    assert 0.09 < 2 * short.extra_kv_b_flops_max / short.layer_flops < 0.11
    assert 0.04 < 2 * latent.extra_kv_b_flops_max / latent.layer_flops < 0.05
    with pytest.raises(ValueError, match="2\\*cp=16"):
        exchange_costs(cfg, seq_len=1000, cp=8)


def test_quick_run_writes_json_and_report(tmp_path):
    code = main(["--quick", "--seq-len", "64", "--hidden-size", "64", "--num-attention-heads", "2",
                 "--q-lora-rank", "32", "--kv-lora-rank", "16", "--output", str(tmp_path),
                 "--docs", str(tmp_path / "benchmarks.md")])
    assert code == 0
    data = json.loads((tmp_path / "context_parallel.json").read_text())
    m = data["metrics"]
    assert m["cp2_bytes_match_formula"] is True
    assert m["cp2_all_gather_bytes_per_rank"] == 32 * (16 + 16) * 4  # N * (C + R) * fp32
    assert m["cp1_step_s"] > 0 and m["cp2_keep_step_s"] > 0
    assert data["settings"] == {**ContextParallelBenchSettings().__dict__, "seq_len": 64, "rounds": 1, "warmup": 1,
                                "hidden_size": 64, "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16}
    assert "Context parallelism for MLA" in (tmp_path / "benchmarks.md").read_text()
