"""Where a training step's time goes: torch.profiler over ours and the reference, side by side.

The same pair as the throughput benchmark (``bench.training.build_pair``: same config, weights,
batch, objective and AdamW rules; fp32, one process). After one warm-up step each, one step of each is
profiled (CPU activities; CUDA too when the pair runs on a GPU), alternating ``rounds`` times, and
the operators' self time is summed per name. The result lists each implementation's hottest
operators (self time, share of the step, calls) and the groups that decide the comparison:

    matmul     aten::mm, aten::bmm, aten::addmm(_), aten::baddbmm, aten::_grouped_mm (the model's FLOPs)
    memory     aten::fill_, aten::zero_, aten::copy_, aten::empty*, aten::cat, aten::index* (data movement)
    other      everything else (elementwise, softmax, norms, the optimizer's foreach kernels)

Self times under the profiler run slower than unprofiled steps; compare the shares, not the seconds,
with the throughput benchmark.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from longcat.bench.common import BenchResult, Table, load_preset
from longcat.bench.training import build_pair, make_batch

MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm", "aten::baddbmm")
MEMORY_PREFIXES = ("aten::fill_", "aten::zero_", "aten::copy_", "aten::empty", "aten::cat", "aten::index",
                   "aten::_index_put_impl_", "aten::scatter", "aten::gather")


@dataclass(frozen=True)
class ProfileSettings:
    preset: str = "small"
    batch_size: int = 8
    seq_len: int = 256
    rounds: int = 2
    top: int = 12
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> ProfileSettings:
        return cls(batch_size=2, seq_len=64, rounds=1, top=8) if quick else cls()


def op_group(name: str) -> str:
    """``matmul``, ``memory`` or ``other`` (see the module doc)."""
    if name in MATMUL_OPS:
        return "matmul"
    if name.startswith(MEMORY_PREFIXES):
        return "memory"
    return "other"


def profile_step(step) -> dict[str, tuple[float, int]]:
    """Self time (seconds, CPU + device) and call count per operator name of one call of ``step``.

    Only ``aten::`` operators are kept: their self times partition the step's operator time.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    out: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        device_us = getattr(event, "self_device_time_total", 0.0) or 0.0
        out[event.key] = ((event.self_cpu_time_total + device_us) / 1e6, event.count)
    return out


def _accumulate(total: dict[str, list[float]], one: dict[str, tuple[float, int]]) -> None:
    for name, (seconds, calls) in one.items():
        entry = total.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += calls


def summarise(per_op: dict[str, list[float]], rounds: int) -> dict:
    """Per step: total operator seconds, per-group seconds and shares, matmul calls."""
    total = sum(s for s, _ in per_op.values()) / rounds
    groups: dict[str, float] = defaultdict(float)
    for name, (seconds, _) in per_op.items():
        groups[op_group(name)] += seconds / rounds
    matmul_calls = sum(int(c) for name, (_, c) in per_op.items() if op_group(name) == "matmul") // rounds
    return {"op_s": total, **{f"{g}_s": groups[g] for g in ("matmul", "memory", "other")},
            **{f"{g}_share": groups[g] / total if total else 0.0 for g in ("matmul", "memory", "other")},
            "matmul_calls": matmul_calls}


def run(*, quick: bool = False, settings: ProfileSettings | None = None) -> BenchResult:
    """Profile ours and the reference, alternating; see the module doc."""
    s = settings or ProfileSettings.for_mode(quick=quick)
    start = time.perf_counter()
    cfg = load_preset(s.preset)
    batch = make_batch(cfg, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
    ours, reference = build_pair(cfg, batch=batch, seed=s.seed)
    ours(), reference()  # warm-up
    per_op: dict[str, dict[str, list[float]]] = {"ours": {}, "reference": {}}
    for _ in range(s.rounds):
        _accumulate(per_op["ours"], profile_step(ours))
        _accumulate(per_op["reference"], profile_step(reference))
    summary = {impl: summarise(ops, s.rounds) for impl, ops in per_op.items()}
    metrics: dict[str, float | int | bool] = {}
    for impl, values in summary.items():
        metrics.update({f"{impl}_{k}": v for k, v in values.items()})
    metrics["op_time_ratio"] = summary["reference"]["op_s"] / summary["ours"]["op_s"]
    metrics["matmul_time_ratio"] = summary["reference"]["matmul_s"] / summary["ours"]["matmul_s"]

    tables = [Table(title="Operator time per step by group (self time under the profiler)",
                    columns=["group", "ours s", "ours share", "reference s", "reference share"],
                    rows=[[g, round(summary["ours"][f"{g}_s"], 3), f"{summary['ours'][f'{g}_share']:.1%}",
                           round(summary["reference"][f"{g}_s"], 3), f"{summary['reference'][f'{g}_share']:.1%}"]
                          for g in ("matmul", "memory", "other")]
                    + [["matmul calls", summary["ours"]["matmul_calls"], "",
                        summary["reference"]["matmul_calls"], ""]])]
    for impl, ops in per_op.items():
        ranked = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:s.top]
        total = summary[impl]["op_s"]
        tables.append(Table(title=f"Hottest operators: {impl}", columns=["operator", "group", "s per step",
                                                                          "share", "calls per step"],
                            rows=[[name, op_group(name), round(sec / s.rounds, 4), f"{sec / s.rounds / total:.1%}",
                                   int(calls) // s.rounds] for name, (sec, calls) in ranked]))
    notes = [f"model preset {s.preset!r}, batch {s.batch_size} x {s.seq_len}, {s.rounds} profiled step(s) each "
             "after one warm-up step, alternating.",
             "Shares are of the summed aten:: self time; profiler overhead inflates small operators."]
    return BenchResult(name="profile", title="Profile of a training step: ours vs transformers (reference)",
                       metrics=metrics, tables=tables, settings=dataclasses.asdict(s), notes=notes,
                       wall_s=time.perf_counter() - start)
