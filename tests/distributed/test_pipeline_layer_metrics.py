"""Per-layer MoE metrics under pipeline parallelism, through the command line.

The same tiny run (4 MoE layers, ``moe.auto_lb_coef`` with R_g measured every step, 3 steps) goes
through ``python -m longcat.train`` once in one process and once per schedule on 2 forked ranks at
pp 2 (1F1B: layers 0-1 / 2-3; ZB-V: 4 stages, layers 0 and 3 on rank 0, 1 and 2 on rank 1). Rank 0
writes ``metrics.jsonl``; every step's per-layer metrics must name every layer of the model by its
global index and equal the single process's values of that layer to 1e-5 relative, and so must the
means over layers (``moe/ffn_experts_per_token``) and the FLOPs behind ``throughput/tflops_per_device``
(they use the measured FFN experts per token of every layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.testing.equivalence import max_relative_difference
from longcat.testing.jobs import run_cli

RTOL = 1e-5
NUM_STEPS = 3
NUM_LAYERS = 4
pytestmark = pytest.mark.timeout(600)

PER_LAYER = ("ffn_experts_per_token", "ffn_experts_per_token_min", "ffn_experts_per_token_max",
             "ffn_experts_per_token_std", "zero_expert_share", "load_max_over_mean", "expert_load",
             "router_cosine_similarity", "rg")
SCHEDULES = {"1f1b": {"parallel.pp": 2}, "zbv": {"parallel.pp": 2, "parallel.pp_schedule": "zbv"}}


def _run(corpus_cache: str, root: Path, name: str, *, nproc: int, **extra) -> dict[int, dict]:
    """step -> the step's training record in rank 0's metrics.jsonl."""
    out_dir = root / name
    overrides = tiny_overrides(corpus_cache, str(out_dir), **{
        "model.num_layers": NUM_LAYERS, "data.seq_length": 16, "data.micro_batch_size": 1,
        "data.global_batch_size": 4, "moe.auto_lb_coef": "true", "moe.router_health_interval": 1,
        "moe.bias_update_rate": 0.2, "train.steps": NUM_STEPS, "train.eval_interval": 0,
        "train.checkpoint_interval": 0, **extra})
    rc, log = run_cli(overrides, log_dir=root / f"{name}-logs", nproc=nproc, timeout_s=420)
    assert rc == 0, log[-4000:]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def _layer_keys(record: dict) -> set[str]:
    return {k for k in record if k.startswith("moe/layer")}


def _step_flops(record: dict) -> float:
    """The FLOPs of the step behind ``throughput/tflops_per_device`` (elapsed time divided out)."""
    return record["throughput/tflops_per_device"] * record["step_time_s"] * 1e12


@pytest.fixture(scope="module")
def reference(corpus_cache, tmp_path_factory):
    return _run(corpus_cache, tmp_path_factory.mktemp("single"), "single", nproc=1)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_pp_logs_every_layer_by_global_index(schedule, corpus_cache, tmp_path, reference):
    steps = _run(corpus_cache, tmp_path, f"pp2-{schedule}", nproc=2, **SCHEDULES[schedule])
    assert sorted(steps) == sorted(reference) == list(range(1, NUM_STEPS + 1))
    world_size = 2
    for step, ref in reference.items():
        got = steps[step]
        want_keys = {f"moe/layer{layer}/{name}" for layer in range(NUM_LAYERS) for name in PER_LAYER}
        assert want_keys <= _layer_keys(ref), sorted(want_keys - _layer_keys(ref))
        assert want_keys <= _layer_keys(got), f"step {step}: missing {sorted(want_keys - _layer_keys(got))}"
        for key in sorted(want_keys) + ["moe/ffn_experts_per_token", "moe/rg_max", "moe/lb_coef"]:
            w = ref[key] if isinstance(ref[key], list) else [ref[key]]
            g = got[key] if isinstance(got[key], list) else [got[key]]
            assert len(g) == len(w), (key, g, w)
            assert max_relative_difference(g, w) <= RTOL, (step, key, g, w)
        flops = _step_flops(got) * world_size
        assert max_relative_difference([flops], [_step_flops(ref)]) <= RTOL, (step, flops, _step_flops(ref))
