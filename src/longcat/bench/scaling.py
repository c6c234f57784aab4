"""How our training step scales with the work: sequence length, experts and layers, each doubled twice.

Every point trains a tiny-ish model (``tiny`` preset dims unless overridden) in its own process
(``bench.child``: tokens/s from the median step, peak RSS from its ``VmHWM``). Alongside, the model
FLOPs per step from ``flops.step_flops`` with the measured k_e show what the work did: doubling S
doubles the matmul FLOPs and quadruples the attention's; doubling the experts (FFN and zero experts
together, top-K fixed) keeps the FLOPs per token and adds parameters; doubling the layers doubles both.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from longcat.bench.child import ChildSpec, run_in_child
from longcat.bench.common import BenchResult, Table, load_preset, median
from longcat.model import count_parameters
from longcat.model.flops import step_flops


@dataclass(frozen=True)
class ScalingSettings:
    preset: str = "tiny"
    batch_size: int = 4
    seq_lens: tuple = (128, 256, 512)
    n_routed_experts: tuple = (8, 16, 32)  # zero experts: half as many, top-K fixed
    num_layers: tuple = (2, 4, 8)
    base_seq_len: int = 256
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    overrides: dict = field(default_factory=dict)

    @classmethod
    def for_mode(cls, *, quick: bool) -> ScalingSettings:
        if quick:
            return cls(batch_size=2, seq_lens=(32, 64, 128), n_routed_experts=(4, 8, 16), num_layers=(1, 2, 4),
                       base_seq_len=64, steps=1, warmup=1, overrides={"vocab_size": 2048})
        return cls()


def points(s: ScalingSettings) -> list[tuple[str, int, dict, int]]:
    """(axis, value, ModelConfig overrides, seq_len) for every point, in run order."""
    out: list[tuple[str, int, dict, int]] = [("seq_len", S, {}, S) for S in s.seq_lens]
    out += [("experts", n, {"n_routed_experts": n, "zero_expert_num": n // 2}, s.base_seq_len)
            for n in s.n_routed_experts]
    out += [("layers", n, {"num_layers": n}, s.base_seq_len) for n in s.num_layers]
    return out


def run(*, quick: bool = False, settings: ScalingSettings | None = None) -> BenchResult:
    """Tokens/s and peak RSS at every point of ``points(settings)``."""
    s = settings or ScalingSettings.for_mode(quick=quick)
    start = time.perf_counter()
    rows, metrics = [], {}
    for axis, value, overrides, seq_len in points(s):
        cfg = load_preset(s.preset, **{**s.overrides, **overrides})
        spec = ChildSpec(impl="ours", model=dataclasses.asdict(cfg), batch_size=s.batch_size, seq_len=seq_len,
                         steps=s.steps, warmup=s.warmup, threads=torch.get_num_threads(), seed=s.seed)
        r = run_in_child(spec)
        step_s = median(r.step_wall_s)
        tokens_per_s = s.batch_size * seq_len / step_s
        f = step_flops(cfg, batch_size=s.batch_size, seq_len=seq_len, ffn_experts_per_token=r.ffn_experts_per_token)
        params = count_parameters(cfg).total
        rows.append([axis, value, f"{params / 1e6:.2f}", f"{tokens_per_s:.0f}", f"{1e3 * step_s:.1f}",
                     f"{r.peak_rss_mib:.0f}", f"{r.training_peak_mib:.0f}", f"{f.matmul_flops / 1e9:.3f}",
                     f"{f.attention_flops / 1e9:.3f}", f"{f.total_flops / step_s / 1e9:.2f}"])
        metrics[f"{axis}_{value}_tokens_per_s"] = tokens_per_s
        metrics[f"{axis}_{value}_peak_rss_mib"] = r.peak_rss_mib
    tables = [Table(
        "Scaling of our training step (fp32, one point per process)",
        ["axis", "value", "params (M)", "tokens/s", "step ms", "peak RSS MiB", "peak above imports MiB",
         "matmul GFLOP/step", "attention GFLOP/step", "achieved GFLOP/s"], rows)]
    notes = [
        f"base: preset {s.preset!r} {s.overrides or ''}, batch {s.batch_size}, seq_len {s.base_seq_len} for the "
        f"expert and layer axes; {s.warmup} warm-up + {s.steps} timed step(s) per point.",
        "experts axis: n_routed_experts doubles with zero_expert_num = n_routed_experts / 2 and moe_topk fixed.",
    ]
    return BenchResult(name="scaling", title="Scaling with sequence length, experts and layers", metrics=metrics,
                       tables=tables, settings=dataclasses.asdict(s), notes=notes, wall_s=time.perf_counter() - start)
