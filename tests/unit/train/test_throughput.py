"""TFLOP/s per device, MFU and peak memory in the step metrics (longcat.train.throughput)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.schema import ModelConfig
from longcat.model.flops import step_flops
from longcat.train.metrics import console_line
from longcat.train.throughput import ThroughputMeter, max_memory_bytes, peak_tflops_per_device


def _meter(peak: float, world_size: int = 2) -> ThroughputMeter:
    return ThroughputMeter(ModelConfig(), global_batch_size=8, seq_length=64, world_size=world_size, peak_tflops=peak)


def test_tflops_per_device_is_the_model_flops_of_the_global_batch_over_devices_and_time():
    cfg = ModelConfig()
    flops = step_flops(cfg, batch_size=8, seq_len=64, ffn_experts_per_token=1.5).total_flops
    out = _meter(peak=0.0).metrics(elapsed_s=0.5, ffn_experts_per_token=1.5)
    assert out == {"throughput/tflops_per_device": pytest.approx(flops / 2 / 0.5 / 1e12)}  # no peak: no MFU
    with_peak = _meter(peak=1e-3).metrics(elapsed_s=0.5, ffn_experts_per_token=1.5)
    assert with_peak["throughput/mfu"] == pytest.approx(with_peak["throughput/tflops_per_device"] / 1e-3)


def test_measured_ffn_experts_per_token_sets_the_expert_flops():
    """Zero-computation experts cost nothing: fewer FFN experts per token, fewer FLOPs; k_e is clamped."""
    meter = _meter(peak=1.0)
    low, high = (meter.metrics(elapsed_s=1.0, ffn_experts_per_token=k)["throughput/tflops_per_device"]
                 for k in (0.5, 2.0))
    assert low < high
    topk = ModelConfig().moe_topk
    assert meter.metrics(elapsed_s=1.0, ffn_experts_per_token=topk + 5) == meter.metrics(
        elapsed_s=1.0, ffn_experts_per_token=topk)


def test_peak_comes_from_the_setting_or_the_gpu():
    cpu = torch.device("cpu")
    assert peak_tflops_per_device(312.0, device=cpu, bf16=False) == 312.0
    assert peak_tflops_per_device(0.0, device=cpu, bf16=True) == 0.0  # CPU: no MFU unless given
    with pytest.raises(ValueError, match="logging.peak_tflops=-1"):
        peak_tflops_per_device(-1.0, device=cpu, bf16=False)


def test_max_memory_on_cpu_is_the_peak_rss():
    before = max_memory_bytes(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4 + before // 4)  # more than the peak so far, touched
    assert max_memory_bytes(torch.device("cpu")) >= block.numel() * 4
    del block


def test_step_metrics_and_console_line_carry_throughput_and_memory(corpus_cache, tmp_path):
    from longcat.config.compose import compose_run_config
    from longcat.train.trainer import Trainer

    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path), **{
        "train.steps": 1, "train.eval_interval": 0, "train.checkpoint_interval": 0, "logging.peak_tflops": 1e-4}))
    Trainer(cfg, config_dict=cfg_dict).fit()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["throughput/tflops_per_device"] > 0 and record["memory/max_gb"] > 0.01
    assert record["throughput/mfu"] == pytest.approx(record["throughput/tflops_per_device"] / 1e-4)
    line = console_line(1, 1, record)
    assert "TFLOP/s/device" in line and "MFU" in line and "max mem GB" in line
