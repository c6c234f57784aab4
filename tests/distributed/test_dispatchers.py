"""The token dispatchers and chunk splits through the trainer: every one computes what one process
computes (3 optimizer steps of a tiny model, fp32, gloo), as ``test_layouts.py`` checks the layouts.

    id                          ranks  tp  ep  dp  moe_dispatcher  moe_chunks  moe_chunk_dim  overlap
    ep2-allgather                 2     1   2   2  allgather       1           -              on
    ep2-allgather-again           2     1   2   2  allgather       1           -              on
    ep2-allgather-sequential      2     1   2   2  allgather       1           -              off
    ep2-token-chunks2             2     1   2   2  alltoall        2           token          on
    cp2xep2-allgather             2     1   2   1  allgather       1           -              on   (cp=2)
    cp2xep2-token-chunks2         2     1   2   1  alltoall        2           token          on   (cp=2)
    ep4-allgather                 4     1   4   4  allgather       1           -              on
    tp2xep2-allgather             4     2   2   2  allgather       1           -              on
    ep4-token-chunks2             4     1   4   4  alltoall        2           token          on
    pp2xep2-allgather             4     1   2   2  allgather       1           -              on   (pp=2)

Per layout: losses and grad norms equal the single process to 1e-5 relative and are the same on every
rank; expert biases bitwise as in one process; final parameters close. The all-gather dispatcher's
reduce-scatter sums in a fixed rank order: a second run and a run without overlap give the same bits.
"""

from __future__ import annotations

import pytest
import torch
from test_layouts import NUM_STEPS, assert_matches_single_process, layout_config

from longcat.testing.equivalence import Layout, run_layouts, run_single

LAYOUTS_2 = [
    Layout("ep2-allgather", dp=2, ep=2, moe_dispatcher="allgather"),
    Layout("ep2-allgather-again", dp=2, ep=2, moe_dispatcher="allgather"),
    Layout("ep2-allgather-sequential", dp=2, ep=2, moe_dispatcher="allgather", overlap_moe_comm=False),
    Layout("ep2-token-chunks2", dp=2, ep=2, moe_chunks=2, moe_chunk_dim="token"),
    Layout("cp2xep2-allgather", cp=2, ep=2, moe_dispatcher="allgather"),
    Layout("cp2xep2-token-chunks2", cp=2, ep=2, moe_chunks=2, moe_chunk_dim="token"),
]
LAYOUTS_4 = [
    Layout("ep4-allgather", dp=4, ep=4, moe_dispatcher="allgather"),
    Layout("tp2xep2-allgather", tp=2, dp=2, ep=2, moe_dispatcher="allgather"),
    Layout("ep4-token-chunks2", dp=4, ep=4, moe_chunks=2, moe_chunk_dim="token"),
    Layout("pp2xep2-allgather", pp=2, dp=2, ep=2, moe_dispatcher="allgather"),
]
ALL = LAYOUTS_2 + LAYOUTS_4


@pytest.fixture(scope="module")
def cfg(corpus_cache, tmp_path_factory):
    return layout_config(corpus_cache, str(tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def reference(cfg):
    return run_single(cfg, num_steps=NUM_STEPS)


@pytest.fixture(scope="module")
def runs(cfg, reference):
    out = run_layouts(cfg, LAYOUTS_2, num_steps=NUM_STEPS, timeout_s=400)
    out.update(run_layouts(cfg, LAYOUTS_4, num_steps=NUM_STEPS, timeout_s=400))
    return out


@pytest.mark.parametrize("layout", ALL, ids=[layout.name for layout in ALL])
def test_dispatcher_matches_single_process(layout, runs, reference):
    assert_matches_single_process(layout, runs[layout.name], reference)


@pytest.mark.parametrize("other", ["ep2-allgather-again", "ep2-allgather-sequential"])
def test_allgather_is_bit_identical_between_runs_and_schedules(other, runs):
    """Fixed reduction order: the same bits on a second run and with the ScMoE overlap off."""
    first, second = runs["ep2-allgather"], runs[other]
    for a, b in zip(first, second):
        assert a.losses == b.losses and a.grad_norms == b.grad_norms, (a.rank, a.losses, b.losses)
        for name, tensor in a.params.items():
            assert torch.equal(tensor, b.params[name]), (a.rank, name)
