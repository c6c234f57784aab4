"""Pipeline parallelism combined with tensor parallelism (+ SP) and with FSDP2, through the command line.

The same tiny run (4 layers, MTP on the last stage, tied embeddings, z-loss, 3 steps, validation
before the first step and after the last, a checkpoint at the end) goes through ``python -m
longcat.train`` once in one process and once per layout on 4 forked ranks; every step's loss and
grad norm in ``metrics.jsonl`` and both validation losses equal the single process's to 1e-5
relative:

    id                    ranks  tp  pp  dp  dp_mode    schedule          notes
    pp2xtp2-sp              4     2   2   1  replicate  interleaved_1f1b  stages exchange [B, S/tp, D]
    pp2xdp2-fsdp            4     1   2   2  fsdp       1f1b              each stage its own FSDP root

The other schedules of both combinations run (untied, through the trainer) in test_layouts.py;
checkpoints saved under them resume under other layouts in test_checkpoint_reshard.py.

All three at once, through the trainer (``longcat.testing.equivalence``) on 8 ranks, the same
config with a global batch of 8:

    pp2xtp2-sp-xdp2-fsdp-zbv  8     2   2   2  fsdp       zbv               FSDP2 over TP shards per stage
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.testing.equivalence import Layout, max_relative_difference, merged_params, run_layouts, run_single
from longcat.testing.jobs import run_cli

RTOL = 1e-5
NUM_STEPS = 3
pytestmark = pytest.mark.timeout(600)

LAYOUTS = {
    "pp2xtp2-sp": {"parallel.pp": 2, "parallel.tp": 2, "parallel.sequence_parallel": "true",
                   "parallel.pp_schedule": "interleaved_1f1b"},
    # dp=2: each dp rank evaluates its own validation micro-batches; 2 each = the reference's 4 samples
    "pp2xdp2-fsdp": {"parallel.pp": 2, "parallel.dp_mode": "fsdp", "train.eval_batches": 2},
}


def _overrides(corpus_cache: str, out_dir: Path, **extra) -> list[str]:
    return tiny_overrides(corpus_cache, str(out_dir), **{
        "model.num_layers": 4, "model.mtp_num_layers": 1, "model.tie_word_embeddings": "true",
        "data.seq_length": 16, "data.micro_batch_size": 1, "data.global_batch_size": 4,
        "moe.lb_num_groups": 2, "loss.z_loss_coef": 1e-4, "train.steps": NUM_STEPS,
        "train.eval_interval": NUM_STEPS, "train.eval_batches": 4, "train.checkpoint_interval": NUM_STEPS, **extra})


def _records(out_dir: Path) -> tuple[dict[int, dict], dict[int, float]]:
    """(step -> the step's training record, step -> validation loss) from metrics.jsonl."""
    steps, val = {}, {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record
        if "val/loss" in record:
            val[record["step"]] = record["val/loss"]
    return steps, val


def _run(corpus_cache: str, root: Path, name: str, *, nproc: int, **extra) -> tuple[dict[int, dict], dict[int, float]]:
    out_dir = root / name
    rc, log = run_cli(_overrides(corpus_cache, out_dir, **extra), log_dir=root / f"{name}-logs", nproc=nproc,
                      timeout_s=420)
    assert rc == 0, log[-4000:]
    assert (out_dir / "checkpoints" / f"step_{NUM_STEPS:08d}").is_dir(), "no checkpoint written"
    return _records(out_dir)


@pytest.fixture(scope="module")
def reference(corpus_cache, tmp_path_factory):
    return _run(corpus_cache, tmp_path_factory.mktemp("single"), "single", nproc=1)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cli_run_matches_single_process(name, corpus_cache, tmp_path, reference):
    steps, val = _run(corpus_cache, tmp_path, name, nproc=4, **LAYOUTS[name])
    ref_steps, ref_val = reference
    assert sorted(steps) == sorted(ref_steps) == list(range(1, NUM_STEPS + 1))
    assert sorted(val) == sorted(ref_val) == [0, NUM_STEPS]  # before the first step and after the last
    for key in ("loss", "grad_norm", "loss/ce", "loss/mtp", "loss/z", "loss/lb"):
        got = [steps[s][key] for s in sorted(steps)]
        want = [ref_steps[s][key] for s in sorted(ref_steps)]
        assert all(w > 0 for w in want), (key, want)  # every term is switched on
        diff = max_relative_difference(got, want)
        print(f"{name}: {key} max relative difference {diff:.2e}")
        assert diff <= RTOL, (key, got, want)
    assert max_relative_difference([val[s] for s in sorted(val)], [ref_val[s] for s in sorted(ref_val)]) <= RTOL


def test_pp_tp_sp_fsdp_on_8_ranks_matches_single_process(corpus_cache, tmp_path):
    cfg, _ = compose_run_config("pretrain", _overrides(corpus_cache, tmp_path, **{"data.global_batch_size": 8}))
    reference = run_single(cfg, num_steps=NUM_STEPS)
    layout = Layout("pp2xtp2-sp-xdp2-fsdp-zbv", pp=2, tp=2, dp=2, dp_mode="fsdp", sequence_parallel=True,
                    pp_schedule="zbv")
    ranks = run_layouts(cfg, [layout], num_steps=NUM_STEPS, timeout_s=500)[layout.name]
    for run in ranks:
        assert run.losses == ranks[0].losses and run.grad_norms == ranks[0].grad_norms, f"rank {run.rank} differs"
    assert max_relative_difference(ranks[0].losses, reference.losses) <= RTOL, (ranks[0].losses, reference.losses)
    assert max_relative_difference(ranks[0].grad_norms, reference.grad_norms) <= RTOL
    params = merged_params(ranks)
    assert params.keys() == reference.params.keys()
    for name, expected in reference.params.items():
        torch.testing.assert_close(params[name], expected, rtol=0, atol=1e-4, msg=name)
