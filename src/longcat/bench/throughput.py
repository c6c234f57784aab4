"""Training throughput against the reference, side by side in one process.

Our ``LongcatFlashForCausalLM`` and transformers' (the reference) hold the same weights, train on
the same batch with the same objective and AdamW rules (``bench.training``), fp32, one process.
After one warm-up step each (whose losses, taken before any update, must agree to ~1e-5 relative),
the two alternate: ``rounds`` times (ours x ``steps_per_round``, reference x ``steps_per_round``),
so that a slow spell of a shared machine hits both. We report the median step time of each, the
tokens/s ratio of the medians and the median of the per-round ratios.

Each round also measures the fp32 matmul throughput at the step's GEMM shapes (``bench.matmul``).
Both implementations do the same model FLOPs, so ``speedup_ceiling = 1 / reference utilisation`` is
the most any implementation could gain over the reference without changing the math: if the
reference already runs its GEMMs at 75% of that throughput, no implementation can be more than
1.33x faster. The target (``TARGET_SPEEDUP``) is the full-step one of docs/benchmarks.md's peers
comparison: 1.15x transformers (it replaced 3x, set when transformers ran its experts in a loop).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from longcat.bench.common import (
    BenchResult,
    Table,
    Timing,
    load_preset,
    median,
    rel_diff,
    timed,
)
from longcat.bench.matmul import measure_matmul_throughput
from longcat.bench.training import OursStep, ReferenceStep, build_pair, make_batch
from longcat.model.flops import gemm_shapes, step_flops

LOSS_MATCH_RTOL = 1e-5
TARGET_SPEEDUP = 1.15


@dataclass(frozen=True)
class ThroughputSettings:
    preset: str = "small"
    batch_size: int = 8
    seq_len: int = 256
    rounds: int = 5
    steps_per_round: int = 2
    measure_matmul: bool = True  # the fp32 matmul throughput at the step's shapes, once per round
    seed: int = 0

    @classmethod
    def for_mode(cls, *, quick: bool) -> ThroughputSettings:
        return cls(batch_size=2, seq_len=64, rounds=2, steps_per_round=1) if quick else cls()


@dataclass
class Alternation:
    """Per-implementation step timings, per-round speedups, ours' k_e values and the paired losses
    (ours, reference) of the timed steps."""

    times: dict[str, list[Timing]]
    round_ratios: list[float]
    k_e_values: list[float]
    paired_losses: list[tuple[float, float]]


def alternate(ours: OursStep, reference: ReferenceStep, *, rounds: int, steps_per_round: int,
              each_round: Callable[[], None] | None = None) -> Alternation:
    """``rounds`` x (``each_round()``, ``steps_per_round`` steps of ours, then as many of the reference)."""
    times: dict[str, list[Timing]] = {"ours": [], "reference": []}
    losses: dict[str, list[float]] = {"ours": [], "reference": []}
    k_e_values, round_ratios = [], []
    for _ in range(rounds):
        if each_round is not None:
            each_round()
        round_s = {}
        for name, step in (("ours", ours), ("reference", reference)):
            for _ in range(steps_per_round):
                out, timing = timed(step)
                times[name].append(timing)
                losses[name].append(out.loss)
                if out.ffn_experts_per_token is not None:
                    k_e_values.append(out.ffn_experts_per_token)
            round_s[name] = median([t.wall_s for t in times[name][-steps_per_round:]])
        round_ratios.append(round_s["reference"] / round_s["ours"])
    return Alternation(times, round_ratios, k_e_values, list(zip(losses["ours"], losses["reference"])))


def summarise(alt: Alternation, *, first_ours: float, first_ref: float, tokens: int, flops: float) -> dict:
    """Headline metrics: medians, ratios, achieved FLOP/s and the loss agreement."""
    wall = {k: median([t.wall_s for t in v]) for k, v in alt.times.items()}
    cpu = {k: median([t.cpu_s for t in v]) for k, v in alt.times.items()}
    loss_diff = rel_diff(first_ours, first_ref)
    return {
        "ours_tokens_per_s": tokens / wall["ours"],
        "reference_tokens_per_s": tokens / wall["reference"],
        "speedup": wall["reference"] / wall["ours"],
        "speedup_median_of_rounds": median(alt.round_ratios),
        "speedup_cpu_time": cpu["reference"] / cpu["ours"],
        "ours_step_ms": 1e3 * wall["ours"],
        "reference_step_ms": 1e3 * wall["reference"],
        "ours_cpu_ms": 1e3 * cpu["ours"],
        "reference_cpu_ms": 1e3 * cpu["reference"],
        "ours_achieved_flop_per_s": flops / wall["ours"],
        "reference_achieved_flop_per_s": flops / wall["reference"],
        "first_step_loss_ours": first_ours,
        "first_step_loss_reference": first_ref,
        "first_step_loss_rel_diff": loss_diff,
        "losses_match": loss_diff <= LOSS_MATCH_RTOL,
        "later_steps_loss_max_rel_diff": max((rel_diff(a, b) for a, b in alt.paired_losses), default=0.0),
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": wall["reference"] / wall["ours"] >= TARGET_SPEEDUP,
    }


def summary_tables(m: dict, *, steps_timed: int) -> list[Table]:
    rows = [[name, f"{m[f'{name}_tokens_per_s']:.0f}", f"{m[f'{name}_step_ms']:.1f}", f"{m[f'{name}_cpu_ms']:.1f}",
             f"{m[f'{name}_achieved_flop_per_s'] / 1e9:.2f}", steps_timed] for name in ("ours", "reference")]
    return [
        Table("Training step (forward, loss, backward, AdamW), fp32, one process",
              ["implementation", "tokens/s", "step ms (median)", "CPU ms (median)", "model GFLOP/s", "steps timed"],
              rows),
        Table("Side by side", ["quantity", "value"], [
            ["speedup (reference step time / ours)", f"{m['speedup']:.2f}x"],
            ["median of per-round speedups", f"{m['speedup_median_of_rounds']:.2f}x"],
            ["speedup in process CPU time", f"{m['speedup_cpu_time']:.2f}x"],
            ["target", f">= {TARGET_SPEEDUP:g}x"],
            ["first-step loss, ours / reference",
             f"{m['first_step_loss_ours']:.6f} / {m['first_step_loss_reference']:.6f}"],
            ["first-step loss relative difference",
             f"{m['first_step_loss_rel_diff']:.1e} (match: <= {LOSS_MATCH_RTOL:.0e})"],
            ["later steps, max loss relative difference", f"{m['later_steps_loss_max_rel_diff']:.1e}"],
            *([["utilisation of measured fp32 matmul throughput, ours / reference",
                f"{100 * m['ours_utilisation']:.1f}% / {100 * m['reference_utilisation']:.1f}%"],
               ["speedup ceiling (ours at 100% utilisation)", f"{m['speedup_ceiling']:.2f}x"]]
              if "speedup_ceiling" in m else []),
        ]),
    ]


def run(*, quick: bool = False, settings: ThroughputSettings | None = None) -> BenchResult:
    """Ours vs the reference, alternating; see the module doc."""
    s = settings or ThroughputSettings.for_mode(quick=quick)
    start = time.perf_counter()
    cfg = load_preset(s.preset)
    batch = make_batch(cfg, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
    ours, reference = build_pair(cfg, batch=batch, seed=s.seed)
    first_ours, first_ref = ours(), reference()  # warm-up; losses before any update
    assert first_ours.ffn_experts_per_token is not None  # OursStep always measures k_e
    gemms = gemm_shapes(cfg, batch_size=s.batch_size, seq_len=s.seq_len,
                        ffn_experts_per_token=first_ours.ffn_experts_per_token)
    matmul_flop_per_s: list[float] = []

    def measure_matmul() -> None:
        if s.measure_matmul:
            matmul_flop_per_s.append(measure_matmul_throughput(gemms, dtype=torch.float32, min_time_s=0.01,
                                                               trials=1).flop_per_s)

    alt = alternate(ours, reference, rounds=s.rounds, steps_per_round=s.steps_per_round, each_round=measure_matmul)
    k_e_values = [first_ours.ffn_experts_per_token, *alt.k_e_values]
    k_e = sum(k_e_values) / len(k_e_values)
    flops = step_flops(cfg, batch_size=s.batch_size, seq_len=s.seq_len, ffn_experts_per_token=k_e).total_flops
    tokens = batch.num_tokens
    metrics = summarise(alt, first_ours=first_ours.loss, first_ref=first_ref.loss, tokens=tokens, flops=flops)
    metrics["ffn_experts_per_token"] = k_e
    if matmul_flop_per_s:
        # At 100% of the measured matmul throughput our step would take flops / throughput: no
        # implementation of the same FLOPs can beat the reference by more than this.
        metrics["matmul_flop_per_s"] = median(matmul_flop_per_s)
        metrics["reference_utilisation"] = metrics["reference_achieved_flop_per_s"] / metrics["matmul_flop_per_s"]
        metrics["ours_utilisation"] = metrics["ours_achieved_flop_per_s"] / metrics["matmul_flop_per_s"]
        metrics["speedup_ceiling"] = 1.0 / metrics["reference_utilisation"]
    notes = [
        f"model preset {s.preset!r}, batch {s.batch_size} x {s.seq_len} = {tokens} tokens/step, "
        f"{s.rounds} alternating rounds of {s.steps_per_round} step(s) each after one warm-up step each.",
        "Reference: transformers LongcatFlashForCausalLM, SDPA attention, use_cache=False, same weights.",
        "Objective: mean next-token cross-entropy only (no z-loss / load-balance loss / clipping) for both; "
        "ours fused with the LM head's GEMM (loss.lm_head_ce=fused, the training default), the reference's "
        "from its logits.",
        "Both then train with the same AdamW rules; later steps' losses are compared too (max relative "
        "difference), but the match criterion is the first step, before summation-order differences compound.",
    ]
    return BenchResult(name="throughput", title="Training throughput: ours vs transformers (reference)",
                       metrics=metrics, tables=summary_tables(metrics, steps_timed=s.rounds * s.steps_per_round),
                       settings=dataclasses.asdict(s), notes=notes,
                       wall_s=time.perf_counter() - start)
