"""Context parallelism through the CLI: ``python -m longcat.train parallel.cp=2 ...`` on 2 and 4 gloo ranks
gives the single-process run's per-step loss and grad norm (metrics.jsonl) to 1e-5 relative over 3 steps.

    id              ranks  cp  tp  pp  ep  dp   notes
    cp2               2     2   1   1   1   1   each rank holds S/2 tokens of every sequence
    cp2xep2           2     2   1   1   2   1   experts folded over the cp ranks (edp=1 x ep=2)
    cp2xtp2           4     2   2   1   1   1   heads over tp inside each cp rank (no SP)
    pp2xcp2xep2       4     2   1   2   2   1   1F1B pipeline of cp stages, experts over cp

A tiny model (4 layers, MTP, hidden z-loss, LB loss with fixed groups) at seq 16 = 4 chunks of 4
tokens per cp=2 pair. ``tests/distributed/test_layouts.py`` adds the parameter-level checks (expert
biases, final weights) for cp layouts under the Trainer harness; ``test_checkpoint_reshard.py`` the
cp <-> single-process checkpoints; ``test_context_parallel.py`` the MLA / model pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from longcat.testing.equivalence import max_relative_difference
from longcat.testing.jobs import run_cli

pytestmark = pytest.mark.timeout(600)

RTOL = 1e-5
NUM_STEPS = 3
LAYOUTS = {  # id: (ranks, parallel overrides)
    "cp2": (2, {"parallel.cp": 2}),
    "cp2xep2": (2, {"parallel.cp": 2, "parallel.ep": 2}),
    "cp2xtp2": (4, {"parallel.cp": 2, "parallel.tp": 2}),
    "pp2xcp2xep2": (4, {"parallel.cp": 2, "parallel.ep": 2, "parallel.pp": 2}),
}


def _overrides(corpus_cache: str, out_dir: Path, **parallel) -> list[str]:
    extra = {"model.num_layers": 4, "data.seq_length": 16, "data.micro_batch_size": 1, "data.global_batch_size": 4,
             "moe.lb_num_groups": 2, "model.mtp_num_layers": 1, "loss.z_loss_coef": 1e-4, "train.steps": NUM_STEPS,
             "train.eval_interval": NUM_STEPS, "train.checkpoint_interval": 0, "optim.warmup_steps": 1, **parallel}
    return tiny_overrides(corpus_cache, str(out_dir), **extra)


def _curve(out_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in steps] == list(range(1, NUM_STEPS + 1)), steps
    return [r["loss"] for r in steps], [r["grad_norm"] for r in steps]


@pytest.fixture(scope="module")
def reference(corpus_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-ref") / "run"
    rc, log = run_cli(_overrides(corpus_cache, out), log_dir=out.parent / "logs", nproc=1)
    assert rc == 0, log[-3000:]
    return _curve(out)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cli_run_matches_single_process(layout, reference, corpus_cache, tmp_path):
    nproc, parallel = LAYOUTS[layout]
    out = tmp_path / "run"
    rc, log = run_cli(_overrides(corpus_cache, out, **parallel), log_dir=tmp_path / "logs", nproc=nproc,
                      timeout_s=300)
    assert rc == 0, log[-3000:]
    losses, grad_norms = _curve(out)
    ref_losses, ref_norms = reference
    print(f"{layout}: loss rel diff {max_relative_difference(losses, ref_losses):.2e}, "
          f"grad norm rel diff {max_relative_difference(grad_norms, ref_norms):.2e}")
    assert max_relative_difference(losses, ref_losses) <= RTOL, (losses, ref_losses)
    assert max_relative_difference(grad_norms, ref_norms) <= RTOL, (grad_norms, ref_norms)


def test_cli_refuses_a_sequence_cp_cannot_split(corpus_cache, tmp_path):
    """Bad input fails before any work, with the numbers and the fix (no process group is started)."""
    out = tmp_path / "run"
    overrides = _overrides(corpus_cache, out, **{"parallel.cp": 2, "data.seq_length": 18})
    rc, log = run_cli(overrides, log_dir=tmp_path / "logs", nproc=2, timeout_s=120)
    assert rc == 2, log[-3000:]
    assert "data.seq_length=18 is not divisible by 2*parallel.cp=4" in log and "16 or 20" in log, log[-3000:]
    assert not out.exists() or not any(out.iterdir())
