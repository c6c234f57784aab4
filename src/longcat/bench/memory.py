"""Peak resident memory of a training process: ours vs the reference, and activation checkpointing.

Each variant trains the same model on the same batch in its own process (``bench.child``), which
reports its own peak resident set size at the end (``VmHWM``; ``ru_maxrss`` alongside, see
``bench.child`` for why it is not the headline figure): the process's high-water mark, including
the interpreter and libraries. We also report the peak *above* the RSS after the imports (model,
gradients, AdamW state, activations, allocator slack), which is what the implementations change.
Activation checkpointing's saving = peak(ours) - peak(ours with ``activation_checkpointing=True``).
The reference's variant with transformers' gradient checkpointing is measured too.

Caveat: the reference's child builds our model first to copy its weights and frees it before
training; that build peak (two copies of the weights) stays below a training step's peak
(weights, gradients, two AdamW moments and activations).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from longcat.bench.child import ChildResult, ChildSpec, run_in_child
from longcat.bench.common import BenchResult, Table, load_preset, median

VARIANTS = (  # (name, impl, activation checkpointing)
    ("ours", "ours", False),
    ("ours + activation checkpointing", "ours", True),
    ("reference", "reference", False),
    ("reference + gradient checkpointing", "reference", True),
)


@dataclass(frozen=True)
class MemorySettings:
    preset: str = "small"
    batch_size: int = 8
    seq_len: int = 512
    steps: int = 2
    warmup: int = 1
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> MemorySettings:
        return cls(batch_size=2, seq_len=64, steps=1, warmup=1) if quick else cls()


def run(*, quick: bool = False, settings: MemorySettings | None = None) -> BenchResult:
    """Peak RSS per variant (one process each); see the module doc."""
    s = settings or MemorySettings.for_mode(quick=quick)
    start = time.perf_counter()
    cfg = load_preset(s.preset)
    results: dict[str, ChildResult] = {}
    for name, impl, ac in VARIANTS:
        spec = ChildSpec(impl=impl, model=dataclasses.asdict(cfg), batch_size=s.batch_size, seq_len=s.seq_len,
                         steps=s.steps, warmup=s.warmup, activation_checkpointing=ac,
                         threads=torch.get_num_threads(), seed=s.seed)
        results[name] = run_in_child(spec)

    ours, ours_ac = results["ours"], results["ours + activation checkpointing"]
    ref = results["reference"]
    saving = ours.peak_rss_mib - ours_ac.peak_rss_mib
    metrics = {
        "ours_peak_rss_mib": ours.peak_rss_mib,
        "reference_peak_rss_mib": ref.peak_rss_mib,
        "ours_training_peak_mib": ours.training_peak_mib,
        "reference_training_peak_mib": ref.training_peak_mib,
        "reference_over_ours_training_peak": ref.training_peak_mib / ours.training_peak_mib,
        "ours_activation_checkpointing_peak_rss_mib": ours_ac.peak_rss_mib,
        "activation_checkpointing_saving_mib": saving,
        "activation_checkpointing_saving_fraction": saving / ours.training_peak_mib,
        "activation_checkpointing_step_time_ratio": median(ours_ac.step_wall_s) / median(ours.step_wall_s),
    }
    rows = [[name, f"{r.baseline_rss_mib:.0f}", f"{r.built_rss_mib:.0f}", f"{r.peak_rss_mib:.0f}",
             f"{r.training_peak_mib:.0f}", f"{1e3 * median(r.step_wall_s):.0f}"] for name, r in results.items()]
    tables = [
        Table("Peak resident memory per training process (MiB)",
              ["variant", "after imports", "model + optimizer built", "peak (VmHWM)", "peak above imports",
               "step ms"], rows),
        Table("Activation checkpointing (ours)", ["quantity", "value"], [
            ["peak saving", f"{saving:.0f} MiB ({100 * metrics['activation_checkpointing_saving_fraction']:.1f}% "
                            "of the peak above imports)"],
            ["step time with / without", f"{metrics['activation_checkpointing_step_time_ratio']:.2f}x"],
        ]),
    ]
    notes = [
        f"model preset {s.preset!r}, batch {s.batch_size} x {s.seq_len}, fp32, AdamW, {s.warmup} warm-up + "
        f"{s.steps} step(s) per process, {torch.get_num_threads()} torch thread(s).",
        "Step times here are single samples in separate processes: see the throughput benchmark for speed.",
        "ru_maxrss of the children (inherited from this suite process when it is larger): "
        + ", ".join(f"{name} {r.ru_maxrss_mib:.0f} MiB" for name, r in results.items()) + ".",
    ]
    return BenchResult(name="memory", title="Peak memory per training process", metrics=metrics, tables=tables,
                       settings=dataclasses.asdict(s), notes=notes, wall_s=time.perf_counter() - start)
