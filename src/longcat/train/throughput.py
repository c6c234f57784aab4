"""Step throughput in model FLOPs (TFLOP/s per device, MFU) and the peak memory of a device.

Model FLOPs are ``longcat.model.flops.step_flops``'s (matmuls 6 x T x P_active plus causal attention;
recomputation not counted) for the global batch of the step, with k_e the step's *measured* FFN experts
per token (zero-computation experts cost nothing). Per device: divided by the world size and the step's
wall time. MFU = that / the device's peak (``logging.peak_tflops``; 0 = the dense bf16 peak of a known
CUDA GPU under ``train.bf16=true``, else no MFU). Metric names (JSONL, console, wandb, TensorBoard):
``throughput/tflops_per_device``, ``throughput/mfu`` (a fraction), ``memory/max_gb`` (10^9 bytes).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

from longcat.config.schema import ModelConfig
from longcat.model.flops import step_flops

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, no sparsity), matched against
# torch.cuda.get_device_name in order (first substring wins).
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("H20", 148.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0),
)


def peak_tflops_per_device(setting: float, *, device: torch.device, bf16: bool) -> float:
    """The peak to measure MFU against, TFLOP/s per device; 0.0 when unknown (MFU is then not reported).

    Args:
        setting: ``logging.peak_tflops``; > 0 is used as given, 0 looks the device up.
        device: the training device; only CUDA devices are looked up.
        bf16: ``train.bf16``; the table holds bf16 peaks, so an fp32 run needs ``setting``.

    Raises:
        ValueError: a negative ``setting``.
    """
    if setting < 0:
        raise ValueError(f"logging.peak_tflops={setting} must be >= 0 (0 = look the device up)")
    if setting > 0:
        return float(setting)
    if device.type != "cuda" or not bf16 or not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), 0.0)


def max_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: ``torch.cuda.max_memory_allocated`` on CUDA, the peak
    resident set size (RSS) of the process on CPU. Bytes."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


@dataclass(frozen=True)
class ThroughputMeter:
    """Turns a step's time and measured k_e into ``throughput/*`` metrics.

    Args:
        model_cfg: model dims for the FLOPs formula.
        global_batch_size, seq_length: sequences per optimizer step (all DP ranks) and their length.
        world_size: devices sharing the step.
        peak_tflops: per device (``peak_tflops_per_device``); 0 = no MFU.
    """

    model_cfg: ModelConfig
    global_batch_size: int
    seq_length: int
    world_size: int
    peak_tflops: float

    def metrics(self, *, elapsed_s: float, ffn_experts_per_token: float) -> dict[str, float]:
        """``throughput/tflops_per_device`` (TFLOP/s) and, with a peak, ``throughput/mfu`` (fraction).

        Args:
            elapsed_s: wall time of the optimizer step, seconds.
            ffn_experts_per_token: measured average over MoE layers (clamped to [0, moe_topk]).
        """
        k_e = min(max(ffn_experts_per_token, 0.0), float(self.model_cfg.moe_topk))
        flops = step_flops(self.model_cfg, batch_size=self.global_batch_size, seq_len=self.seq_length,
                           ffn_experts_per_token=k_e).total_flops
        tflops = flops / self.world_size / max(elapsed_s, 1e-9) / 1e12
        out = {"throughput/tflops_per_device": tflops}
        if self.peak_tflops > 0:
            out["throughput/mfu"] = tflops / self.peak_tflops
        return out
