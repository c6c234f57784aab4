"""Run training steps in a fresh process and report its peak resident memory.

Peak RSS is a per-process high-water mark, so every measured variant gets its own process:
``run_in_child(spec)`` starts ``python -m longcat.bench.child '<json spec>'`` and parses the one JSON
line it prints. The child imports only what its variant needs (transformers only for the reference),
records its RSS after the imports (``baseline_rss_mib``), builds the model and optimizer, runs
``warmup + steps`` training steps and reports its peak RSS.

The peak is read in the child from ``VmHWM`` (/proc/self/status), the high-water mark of the
child's own address space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is reported too
(``ru_maxrss_mib``), but on Linux a child started by fork + exec inherits its parent's ru_maxrss
when that is larger, so under a suite process that has already built models it reads the parent's
peak, not the child's (measured: a child using 10 MiB reported its 520 MiB parent's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

CHILD_TIMEOUT_S = 1800


@dataclass
class ChildSpec:
    """impl: "ours" or "reference". model: ModelConfig fields. threads: torch intra-op threads (0 =
    torch's default)."""

    impl: str
    model: dict[str, Any]
    batch_size: int
    seq_len: int
    steps: int = 2
    warmup: int = 1
    activation_checkpointing: bool = False
    threads: int = 0
    seed: int = 0


@dataclass
class ChildResult:
    """Memory in MiB, step times in seconds (measured steps only). ffn_experts_per_token: ours' measured
    k_e (0.0 for the reference, which reports no router statistics)."""

    baseline_rss_mib: float
    built_rss_mib: float
    peak_rss_mib: float
    ru_maxrss_mib: float = 0.0
    step_wall_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    ffn_experts_per_token: float = 0.0

    @property
    def training_peak_mib(self) -> float:
        """Peak above the post-import baseline: what the model, optimizer and activations add."""
        return self.peak_rss_mib - self.baseline_rss_mib


def run_in_child(spec: ChildSpec, *, timeout_s: float = CHILD_TIMEOUT_S) -> ChildResult:
    """Run ``spec`` in a new interpreter. Raises RuntimeError with the child's stderr if it fails."""
    if spec.impl not in ("ours", "reference"):
        raise ValueError(f"impl={spec.impl!r}: use 'ours' or 'reference'")
    cmd = [sys.executable, "-m", "longcat.bench.child", json.dumps(dataclasses.asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed (rc={proc.returncode}) for {spec}:\n{proc.stderr[-4000:]}")
    return ChildResult(**json.loads(lines[-1]))


def _main(spec: ChildSpec) -> ChildResult:
    import gc
    import importlib
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    # Imported here, after the thread setting, so that the baseline RSS below counts them (the child
    # imports only what its variant needs; see the module docstring).
    from longcat.bench.common import current_rss_mib, peak_rss_mib, ru_maxrss_mib, timed
    from longcat.bench.training import (
        OursStep,
        ReferenceStep,
        build_ours,
        build_reference,
        make_batch,
    )
    from longcat.config.schema import ModelConfig

    if spec.impl == "reference":  # import it before the baseline RSS, like our own modules
        importlib.import_module("transformers")
    cfg = ModelConfig(**spec.model)
    cfg.validate()
    batch = make_batch(cfg, batch_size=spec.batch_size, seq_len=spec.seq_len, seed=spec.seed)
    baseline = current_rss_mib()
    ours = build_ours(cfg, seed=spec.seed, activation_checkpointing=spec.activation_checkpointing)
    step: OursStep | ReferenceStep
    if spec.impl == "ours":
        step = OursStep(ours, batch=batch)
    else:
        model = build_reference(cfg, state_dict=ours.state_dict(),
                                activation_checkpointing=spec.activation_checkpointing)
        del ours
        gc.collect()
        step = ReferenceStep(model, batch=batch, model_cfg=cfg)
    built = current_rss_mib()
    result = ChildResult(baseline_rss_mib=baseline, built_rss_mib=built, peak_rss_mib=0.0)
    k_e = []
    for i in range(spec.warmup + spec.steps):
        out, timing = timed(step)
        if out.ffn_experts_per_token is not None:
            k_e.append(out.ffn_experts_per_token)
        if i >= spec.warmup:
            result.step_wall_s.append(timing.wall_s)
            result.step_cpu_s.append(timing.cpu_s)
            result.losses.append(out.loss)
    result.ffn_experts_per_token = sum(k_e) / len(k_e) if k_e else 0.0
    result.peak_rss_mib = peak_rss_mib()
    result.ru_maxrss_mib = ru_maxrss_mib()
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m longcat.bench.child '<json ChildSpec>'")
    print(json.dumps(dataclasses.asdict(_main(ChildSpec(**json.loads(sys.argv[1]))))))
