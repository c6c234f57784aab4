"""The machine's matmul throughput at a model's GEMM shapes (the denominator of the utilisation).

For each distinct shape of ``flops.gemm_shapes`` we time ``torch.mm`` (``torch.bmm`` for the
attention's per-head products) on contiguous random operands of the given dtype, and combine the
rates weighted by each GEMM's share of the model FLOPs:

    achievable FLOP/s = sum_i flops_i / sum_i (flops_i / rate_i)

i.e. the rate at which the step's model FLOPs would run if every GEMM ran as fast as a bare
``torch.mm`` of its shape, back to back. The weight-gradient GEMM is timed with contiguous operands
(autograd passes a transposed view, which BLAS reads without a copy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from longcat.bench.common import median
from longcat.model.flops import Gemm


@dataclass(frozen=True)
class GemmRate:
    """The measured rate of one GEMM shape: seconds per call (median over trials) and FLOP/s."""

    gemm: Gemm
    seconds_per_call: float

    @property
    def flop_per_s(self) -> float:
        g = self.gemm
        return 2 * g.batch * g.m * g.k * g.n / self.seconds_per_call


@dataclass(frozen=True)
class MatmulThroughput:
    """flop_per_s: the model-FLOP-weighted achievable rate (module doc). rates: per GEMM."""

    dtype: str
    flop_per_s: float
    rates: list[GemmRate]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gemm(gemm: Gemm, *, dtype: torch.dtype, device: torch.device | str = "cpu", min_time_s: float = 0.02,
              trials: int = 3, seed: int = 0) -> float:
    """Median seconds of one ``[batch, m, k] x [batch, k, n]`` product; each trial repeats the call
    until ``min_time_s`` has passed (after one warm-up call)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(gemm.batch, gemm.m, gemm.k, generator=gen, device=device).to(dtype)
    b = torch.randn(gemm.batch, gemm.k, gemm.n, generator=gen, device=device).to(dtype)
    out = torch.empty(gemm.batch, gemm.m, gemm.n, device=device, dtype=dtype)
    if gemm.batch == 1:
        a, b, out = a[0], b[0], out[0]
        run = lambda: torch.mm(a, b, out=out)  # noqa: E731
    else:
        run = lambda: torch.bmm(a, b, out=out)  # noqa: E731
    run()
    _sync(device)
    reps = 1
    per_call = []
    for _ in range(max(1, trials)):
        while True:
            start = time.perf_counter()
            for _ in range(reps):
                run()
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s or reps >= 1 << 20:
                break
            reps = max(reps * 2, int(reps * min_time_s / max(elapsed, 1e-9)) + 1)
        per_call.append(elapsed / reps)
    return median(per_call)


def measure_matmul_throughput(gemms: list[Gemm], *, dtype: torch.dtype, device: torch.device | str = "cpu",
                              min_time_s: float = 0.02, trials: int = 3) -> MatmulThroughput:
    """Time every distinct shape of ``gemms`` once (shared by GEMMs of the same shape) and combine
    them weighted by model FLOPs. Raises ValueError on an empty list."""
    if not gemms:
        raise ValueError("no GEMMs to measure")
    seconds: dict[tuple[int, int, int, int], float] = {}
    rates = []
    for gemm in gemms:
        if gemm.shape_key not in seconds:
            seconds[gemm.shape_key] = time_gemm(gemm, dtype=dtype, device=device, min_time_s=min_time_s, trials=trials)
        rates.append(GemmRate(gemm=gemm, seconds_per_call=seconds[gemm.shape_key]))
    total_flops = sum(r.gemm.model_flops for r in rates)
    total_time = sum(r.gemm.model_flops / r.flop_per_s for r in rates)
    return MatmulThroughput(dtype=str(dtype).removeprefix("torch."), flop_per_s=total_flops / total_time, rates=rates)
