import pytest
import torch

from longcat.bench import torchtitan_peer
from longcat.bench.peers import PeerConfig, PeersSettings, Sample, count_host_syncs, gemm_share, ratio_to, run


def test_matched_top_k_is_the_expected_ffn_experts_per_token():
    assert PeerConfig(64, 32, 12).ffn_experts_per_token == 8
    assert PeerConfig(128, 64, 12).ffn_experts_per_token == 8
    assert PeerConfig(64, 32, 8).ffn_experts_per_token == 5
    assert PeerConfig(16, 0, 4).ffn_experts_per_token == 4


def test_configs_are_longcat_shaped():
    s = PeersSettings()
    for peer in s.configs:
        cfg = s.model_config(peer)
        assert cfg.n_routed_experts >= 64 and cfg.zero_expert_num == cfg.n_routed_experts // 2
        assert abs(cfg.expert_ffn_hidden_size - cfg.hidden_size / 3) < 8
    assert {peer.moe_topk for peer in s.configs} == {8, 12}


def test_host_sync_counter_sees_value_reads_and_not_device_ops():
    x = torch.arange(6)
    with count_host_syncs() as syncs:
        y = x * 2 + 1
        torch.repeat_interleave(x, x, output_size=int(x.sum()))  # the int() is one
        _ = y[y > 3]  # a boolean mask: one
        _ = x.sum().item()  # one
    assert syncs.counts == {"__int__": 1, "__getitem__": 1, "item": 1}
    assert syncs.total == 3


def test_gemm_share_splits_matmul_from_the_rest():
    # large enough that the GEMM outweighs aten::matmul's dispatch on a fast CPU (256^3 gave 0.87 on an AMX Xeon)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    only_gemm = gemm_share(lambda: a @ b)
    mostly_elementwise = gemm_share(lambda: [a.exp() + b.sin() for _ in range(20)] and a[:8] @ b[:, :8])
    assert only_gemm > 0.9  # the rest: aten::matmul dispatching to aten::mm
    assert 0.0 < mostly_elementwise < 0.5


def test_ratio_is_peer_time_over_ours_per_round():
    samples = {"ours": [Sample(1.0, 0.0), Sample(2.0, 0.0), Sample(1.0, 0.0)],
               "peer": [Sample(2.0, 0.0), Sample(2.0, 0.0), Sample(3.0, 0.0)]}
    assert ratio_to(samples, "peer") == pytest.approx(2.0)


def test_torchtitan_is_skipped_with_a_reason_when_not_configured(monkeypatch):
    monkeypatch.delenv(torchtitan_peer.ENV_VAR, raising=False)
    tt, why = torchtitan_peer.load_torchtitan()
    assert tt is None and torchtitan_peer.ENV_VAR in why


def test_quick_peers_bench_without_torchtitan(monkeypatch):
    monkeypatch.setenv(torchtitan_peer.ENV_VAR, "")
    settings = PeersSettings(preset="tiny", expert_ffn_hidden_size=24, batch_size=1, seq_len=16, block_rounds=1,
                             step_rounds=1, configs=(PeerConfig(8, 4, 4),))
    result = run(settings=settings)
    m = result.metrics
    assert m["torchtitan_available"] is False
    assert m["8_4_top4_block_ours_vs_transformers"] > 0 and m["8_4_top4_step_ours_vs_transformers"] > 0
    # the expert counts need one host sync per MoE layer (the routed-row count); nothing else may add one
    assert m["8_4_top4_ours_host_syncs_per_step"] == settings.model_config(settings.configs[0]).num_layers
    assert [row[1] for row in result.tables[0].rows] == ["ours", "ours bf16 autocast", "transformers"]
    assert m["8_4_top4_block_ours_bf16_autocast_ms"] > 0
    # ours' step also with its dense blocks compiled (train.compile)
    assert [row[1] for row in result.tables[1].rows] == ["ours", "ours compiled", "transformers"]
    assert m["8_4_top4_step_compiled_speedup"] > 0 and m["8_4_top4_step_ours_compiled_vs_transformers"] > 0
    assert result.tables[2].rows[0][0] == "8+4 top-4" and "compiled" in result.tables[2].title
    assert len(result.tables) == 5  # no matched-precision table without torchtitan
    assert "torchtitan skipped" in result.notes[-1]
    for kind in ("block", "step"):  # the GEMM floor is below ours' time, the ceiling above ours' ratio
        share = m[f"8_4_top4_{kind}_ours_gemm_share"]
        assert 0.0 < share < 1.0
        assert m[f"8_4_top4_{kind}_ours_ceiling_vs_transformers"] > m[f"8_4_top4_{kind}_ours_vs_transformers"] * 0.9
    assert [row[:2] for row in result.tables[4].rows] == [["8+4 top-4", "block"], ["8+4 top-4", "step"]]
