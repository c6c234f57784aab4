"""Model FLOP utilisation of our training step against the machine's matmul throughput, fp32 and bf16.

Achieved FLOP/s = ``flops.step_flops`` (model FLOPs, measured k_e) / median step time. The machine's
matmul throughput is measured in the same run at the step's own GEMM shapes (``matmul``); the
fraction achieved / throughput is the utilisation (MFU against a measured, shape-aware ceiling,
not a datasheet peak). Matmul measurements and training steps alternate (``rounds``) so that a
slow spell of a shared machine hits both. bf16 runs the step under ``torch.autocast`` (fp32 master
weights, as ``train.bf16``) and the GEMMs in bf16.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass

import torch

from longcat.bench.common import BenchResult, KernelCost, Table, load_preset, median, timed
from longcat.bench.matmul import MatmulThroughput, measure_matmul_throughput
from longcat.bench.training import OursStep, build_ours, make_batch
from longcat.model.compile import compile_dense_blocks
from longcat.model.flops import gemm_shapes, step_flops

# Targets: non-GEMM work <= 10% of the fp32 step, bf16 at >= 60% of the bf16 GEMM rate.
TARGET_FRACTION = 0.9
TARGET_FRACTION_BF16 = 0.6


@dataclass(frozen=True)
class UtilisationSettings:
    preset: str = "small"
    batch_size: int = 8
    seq_len: int = 256
    rounds: int = 3
    steps_per_round: int = 2
    dtypes: tuple = ("float32", "bfloat16")
    matmul_min_time_s: float = 0.02
    matmul_trials: int = 3
    # each dtype also with the dense blocks compiled (train.compile; the warm-up step compiles)
    compiled: bool = True
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> UtilisationSettings:
        if quick:
            return cls(batch_size=2, seq_len=64, rounds=1, steps_per_round=1, matmul_min_time_s=0.005, matmul_trials=1,
                       compiled=False)
        return cls()


@dataclass
class DtypeUtilisation:
    dtype: str
    step_s: float
    ffn_experts_per_token: float
    model_flops: float
    achieved_flop_per_s: float
    matmul_flop_per_s: float
    matmul: MatmulThroughput
    compiled: bool = False
    kernel_share: float = 0.0  # median over steps of system CPU time / wall time (page faults, mostly)
    faulted_mib: float = 0.0  # median over steps of the memory faulted in (minor faults x page size)

    @property
    def label(self) -> str:
        return self.dtype + (" compiled" if self.compiled else "")

    @property
    def fraction(self) -> float:
        return self.achieved_flop_per_s / self.matmul_flop_per_s


def measure_dtype(s: UtilisationSettings, *, dtype: torch.dtype, compiled: bool = False) -> DtypeUtilisation:
    """Warm-up step (with ``compiled``: it compiles the dense blocks, ``train.compile``), then ``rounds`` x
    (matmul throughput, ``steps_per_round`` steps)."""
    cfg = load_preset(s.preset)
    batch = make_batch(cfg, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
    model = build_ours(cfg, seed=s.seed)
    if compiled:
        compile_dense_blocks(model)
    step = OursStep(model, batch=batch, autocast_dtype=dtype)
    first = step()
    assert first.ffn_experts_per_token is not None  # OursStep always measures k_e
    k_e_values = [first.ffn_experts_per_token]
    step_s, throughputs, kernel_shares, faulted = [], [], [], []
    for _ in range(s.rounds):
        k_e = sum(k_e_values) / len(k_e_values)
        gemms = gemm_shapes(cfg, batch_size=s.batch_size, seq_len=s.seq_len, ffn_experts_per_token=k_e)
        throughputs.append(measure_matmul_throughput(gemms, dtype=dtype, min_time_s=s.matmul_min_time_s,
                                                     trials=s.matmul_trials))
        for _ in range(s.steps_per_round):
            before = resource.getrusage(resource.RUSAGE_SELF)
            out, timing = timed(step)
            cost = KernelCost.between(before, resource.getrusage(resource.RUSAGE_SELF))
            k_e_values.append(out.ffn_experts_per_token)
            step_s.append(timing.wall_s)
            kernel_shares.append(cost.kernel_s / timing.wall_s)
            faulted.append(cost.faulted_mib)
    k_e = sum(k_e_values) / len(k_e_values)
    flops = step_flops(cfg, batch_size=s.batch_size, seq_len=s.seq_len, ffn_experts_per_token=k_e).total_flops
    median_round = sorted(throughputs, key=lambda t: t.flop_per_s)[len(throughputs) // 2]
    t_step = median(step_s)
    return DtypeUtilisation(dtype=str(dtype).removeprefix("torch."), step_s=t_step, ffn_experts_per_token=k_e,
                            model_flops=flops, achieved_flop_per_s=flops / t_step,
                            matmul_flop_per_s=median([t.flop_per_s for t in throughputs]), matmul=median_round,
                            compiled=compiled, kernel_share=median(kernel_shares), faulted_mib=median(faulted))


def _breakdown_table(cfg, s: UtilisationSettings, k_e: float) -> Table:
    f = step_flops(cfg, batch_size=s.batch_size, seq_len=s.seq_len, ffn_experts_per_token=k_e)
    parts = [("dense matmuls (MLA projections, dense FFNs, router)", f.dense_matmul_flops),
             (f"FFN experts (k_e = {k_e:.2f} per token per layer)", f.expert_matmul_flops),
             ("LM head", f.lm_head_flops), ("attention scores + values (causal)", f.attention_flops)]
    rows = [[name, f"{v / 1e9:.3f}", f"{100 * v / f.total_flops:.1f}%"] for name, v in parts]
    rows.append(["total", f"{f.total_flops / 1e9:.3f}", "100%"])
    return Table("Model FLOPs per step (forward + backward; see longcat/model/flops.py)",
                 ["component", "GFLOP", "share"], rows)


def _gemm_table(result: DtypeUtilisation, top: int = 8) -> Table:
    rates = sorted(result.matmul.rates, key=lambda r: -r.gemm.model_flops)[:top]
    rows = [[r.gemm.name, f"{r.gemm.batch}x{r.gemm.m}x{r.gemm.k}x{r.gemm.n}", r.gemm.count,
             f"{r.gemm.model_flops / 1e9:.3f}", f"{r.flop_per_s / 1e9:.1f}"] for r in rates]
    return Table(f"Largest GEMMs of the step and their measured torch.mm rate ({result.dtype})",
                 ["GEMM", "batch x m x k x n", "per step", "model GFLOP", "GFLOP/s"], rows)


def run(*, quick: bool = False, settings: UtilisationSettings | None = None) -> BenchResult:
    """Utilisation at each dtype of ``settings.dtypes``; see the module doc."""
    s = settings or UtilisationSettings.for_mode(quick=quick)
    start = time.perf_counter()
    cfg = load_preset(s.preset)
    results = [measure_dtype(s, dtype=getattr(torch, name), compiled=compiled) for name in s.dtypes
               for compiled in ((False, True) if s.compiled else (False,))]
    metrics: dict = {}
    for r in results:
        tag = {"float32": "fp32", "bfloat16": "bf16"}.get(r.dtype, r.dtype) + ("_compiled" if r.compiled else "")
        metrics.update({
            f"{tag}_step_ms": 1e3 * r.step_s,
            f"{tag}_tokens_per_s": s.batch_size * s.seq_len / r.step_s,
            f"{tag}_achieved_flop_per_s": r.achieved_flop_per_s,
            f"{tag}_matmul_flop_per_s": r.matmul_flop_per_s,
            f"{tag}_utilisation": r.fraction,
            f"{tag}_kernel_share": r.kernel_share,
            f"{tag}_faulted_mib_per_step": r.faulted_mib,
        })
    if "fp32_utilisation" in metrics:
        metrics["target_fp32_utilisation"] = TARGET_FRACTION
        metrics["meets_target"] = metrics["fp32_utilisation"] >= TARGET_FRACTION
    if "bf16_utilisation" in metrics:
        metrics["target_bf16_utilisation"] = TARGET_FRACTION_BF16
        metrics["meets_bf16_target"] = metrics["bf16_utilisation"] >= TARGET_FRACTION_BF16
    metrics["model_flops_per_step"] = results[0].model_flops
    metrics["ffn_experts_per_token"] = results[0].ffn_experts_per_token
    rows = [[r.label, f"{1e3 * r.step_s:.1f}", f"{r.model_flops / 1e9:.3f}", f"{r.achieved_flop_per_s / 1e9:.2f}",
             f"{r.matmul_flop_per_s / 1e9:.2f}", f"{100 * r.fraction:.1f}%", f"{r.kernel_share:.0%}",
             round(r.faulted_mib)] for r in results]
    tables = [
        Table(f"Utilisation of our training step (targets >= {TARGET_FRACTION:.0%} at fp32, "
              f">= {TARGET_FRACTION_BF16:.0%} at bf16)",
              ["dtype", "step ms", "model GFLOP/step", "achieved GFLOP/s", "matmul GFLOP/s at these shapes",
               "utilisation", "kernel time share", "faulted in MiB"], rows),
        _breakdown_table(cfg, s, results[0].ffn_experts_per_token),
        *[_gemm_table(r) for r in results if not r.compiled],
    ]
    notes = [
        f"model preset {s.preset!r}, batch {s.batch_size} x {s.seq_len}; step = forward, loss, backward, AdamW.",
        "kernel time share: the step's system CPU time over its wall time, mostly the kernel faulting in (zero-"
        "filling) fresh pages (with several threads every thread's system time adds up, beyond 100% with "
        "spinning OpenMP threads: read it at --threads 1); faulted in: minor page faults x the base page size "
        "per step (under-reports with transparent huge pages). Run in a process of its own under glibc's "
        "default allocator settings.",
        "Matmul throughput: FLOP-weighted torch.mm/bmm rate at the step's GEMM shapes, measured in this run "
        "(longcat/bench/matmul.py); utilisation = achieved / that.",
        "bf16 = torch.autocast(bfloat16) with fp32 weights and AdamW, as train.bf16.",
        "compiled = the dense blocks under torch.compile (train.compile: MLA, SwiGLU, RMSNorm; the MoE eager); "
        "its warm-up step compiles and is not timed.",
    ]
    return BenchResult(name="utilisation", title="Model FLOP utilisation (MFU against measured matmul throughput)",
                       metrics=metrics, tables=tables, settings=dataclasses.asdict(s), notes=notes,
                       wall_s=time.perf_counter() - start)
