"""Every parallel layout computes what one process computes (3 optimizer steps of a tiny model, fp32).

Each layout runs the real ``Trainer`` (``longcat.testing.equivalence``) on the cached test corpus; the
single-process run is the reference. Per layout and step: the loss and the global grad norm equal the
reference to 1e-5 relative and are the same on every rank; the expert biases are bitwise the same on
every rank holding a layer (and as in one process: the controller sees the same integer counts); the
final parameters, gathered to global tensors, match the reference.

The layouts of one world size run in one set of processes (start-up dominates on CPU):

    id                        ranks  tp  pp  ep  dp  dp_mode     notes (cp: context parallel degree)
    dp2-replicate               2     1   1   1   2  replicate   bucketed all-reduce (sum)
    dp2-fsdp                    2     1   1   1   2  fsdp        FSDP2, experts their own units
    dp2-deepspeed-z2            2     1   1   1   2  deepspeed   ZeRO-2
    dp2-deepspeed-z1-offload    2     1   1   1   2  deepspeed   ZeRO-1, optimizer on CPU
    tp2                         2     2   1   1   1  replicate
    tp2-sp                      2     2   1   1   1  replicate   sequence parallel
    ep2                         2     1   1   2   2  replicate   edp = 1
    pp2-1f1b                    2     1   2   1   1  replicate
    pp2-interleaved_1f1b        2     1   2   1   1  replicate   2 stages per rank
    pp2-zbv                     2     1   2   1   1  replicate   V placement, split backward
    cp2xep2                     2     1   1   2   1  replicate   cp=2, experts folded over cp
    cp2-fsdp                    2     1   1   1   1  fsdp        cp=2, FSDP2 shards over the cp ranks
    tp2xep2                     4     2   1   2   2  replicate   edp = 2
    pp2xep2                     4     1   2   2   2  replicate
    pp2xdp2                     4     1   2   1   2  replicate
    tp2xdp2-fsdp                4     2   1   1   2  fsdp        FSDP2 shards of TP shards
    pp2xtp2-1f1b                4     2   2   1   1  replicate   vocab-parallel CE on the last stage
    pp2xtp2-sp-zbv              4     2   2   1   1  replicate   SP: stages exchange [B, S/tp, D]
    pp2xdp2-fsdp-interleaved    4     1   2   1   2  fsdp        each virtual stage its own FSDP root
    pp2xdp2xep2-fsdp-zbv        4     1   2   2   2  fsdp        the embedding both V ends share kept whole
    pp2xcp2-zbv                 4     1   2   1   1  replicate   cp=2, ZB-V pipeline of cp stages

PP with TP (+SP) and with FSDP under the remaining schedules, with tied embeddings, run through the
command line in test_pipeline_layouts.py, and all three together (8 ranks) there too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.testing.equivalence import (
    Layout,
    max_relative_difference,
    merged_params,
    run_layouts,
    run_single,
)

RTOL = 1e-5
PARAM_ATOL = 1e-4  # after 3 AdamW steps (lr 3e-3); a wrong shard or a missed reduction is far larger
NUM_STEPS = 3

LAYOUTS_2 = [
    Layout("dp2-replicate", dp=2),
    Layout("dp2-fsdp", dp=2, dp_mode="fsdp"),
    Layout("tp2", tp=2),
    Layout("tp2-sp", tp=2, sequence_parallel=True),
    Layout("ep2", dp=2, ep=2),
    Layout("pp2-1f1b", pp=2),
    Layout("pp2-interleaved_1f1b", pp=2, pp_schedule="interleaved_1f1b"),
    Layout("pp2-zbv", pp=2, pp_schedule="zbv"),
    Layout("cp2xep2", cp=2, ep=2),
    Layout("cp2-fsdp", cp=2, dp_mode="fsdp"),
    # DeepSpeed last: its engine sets process-wide state of its own.
    Layout("dp2-deepspeed-z2", dp=2, dp_mode="deepspeed", zero_stage=2),
    Layout("dp2-deepspeed-z1-offload", dp=2, dp_mode="deepspeed", zero_stage=1, offload_optimizer=True),
]
LAYOUTS_4 = [
    Layout("tp2xep2", tp=2, dp=2, ep=2),
    Layout("pp2xep2", pp=2, dp=2, ep=2),
    Layout("pp2xdp2", pp=2, dp=2),
    Layout("tp2xdp2-fsdp", tp=2, dp=2, dp_mode="fsdp"),
    Layout("pp2xtp2-1f1b", pp=2, tp=2),
    Layout("pp2xtp2-sp-zbv", pp=2, tp=2, sequence_parallel=True, pp_schedule="zbv"),
    Layout("pp2xdp2-fsdp-interleaved", pp=2, dp=2, dp_mode="fsdp", pp_schedule="interleaved_1f1b"),
    Layout("pp2xdp2xep2-fsdp-zbv", pp=2, dp=2, ep=2, dp_mode="fsdp", pp_schedule="zbv"),
    Layout("pp2xcp2-zbv", pp=2, cp=2, pp_schedule="zbv"),
]
ALL = LAYOUTS_2 + LAYOUTS_4


def layout_config(corpus_cache: str, out_dir: str, **extra):
    """4 layers (two pipeline stages per rank for interleaved / ZB-V), seq 16, 4 micro-batches of 1."""
    overrides = {"model.num_layers": 4, "data.seq_length": 16, "data.micro_batch_size": 1,
                 "data.global_batch_size": 4, "moe.lb_num_groups": 2, "model.mtp_num_layers": 1,
                 "loss.z_loss_coef": 1e-4, **extra}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, out_dir, **overrides))
    return cfg


@pytest.fixture(scope="module")
def cfg(corpus_cache, tmp_path_factory):
    return layout_config(corpus_cache, str(tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def reference(cfg):
    return run_single(cfg, num_steps=NUM_STEPS)


@pytest.fixture(scope="module")
def runs(cfg, reference):
    out = run_layouts(cfg, LAYOUTS_2, num_steps=NUM_STEPS, timeout_s=400)
    out.update(run_layouts(cfg, LAYOUTS_4, num_steps=NUM_STEPS, timeout_s=500))
    return out


def assert_matches_single_process(layout: Layout, ranks, reference, *, num_steps: int = NUM_STEPS) -> None:
    """The checks of every layout test: ``ranks`` (one ``LayoutRun`` per rank of ``layout``) agree with
    each other bitwise on losses and grad norms, and with ``reference`` (one process) to ``RTOL``; the
    expert biases bitwise as in one process on every rank holding a layer; the final parameters to
    ``PARAM_ATOL``."""
    assert len(ranks) == layout.world_size
    for run in ranks:
        assert run.losses == ranks[0].losses and run.grad_norms == ranks[0].grad_norms, f"rank {run.rank} differs"
    loss_diff = max_relative_difference(ranks[0].losses, reference.losses)
    norm_diff = max_relative_difference(ranks[0].grad_norms, reference.grad_norms)
    print(f"{layout.name}: max relative difference loss {loss_diff:.2e}, grad norm {norm_diff:.2e}")
    assert loss_diff <= RTOL, (ranks[0].losses, reference.losses)
    assert norm_diff <= RTOL, (ranks[0].grad_norms, reference.grad_norms)
    for step in range(num_steps):  # every rank holding a layer has its bias bitwise, as in one process
        for run in ranks:
            for layer, bias in run.biases[step].items():
                assert torch.equal(bias, reference.biases[step][layer]), (run.rank, step, layer)
    params = merged_params(ranks)
    assert params.keys() == reference.params.keys()
    for name, expected in reference.params.items():
        torch.testing.assert_close(params[name], expected, rtol=0, atol=PARAM_ATOL, msg=name)


@pytest.mark.parametrize("layout", ALL, ids=[layout.name for layout in ALL])
def test_layout_matches_single_process(layout, runs, reference):
    assert_matches_single_process(layout, runs[layout.name], reference)
    assert any(b.abs().sum() > 0 for b in reference.biases[-1].values()), "the bias controller never moved"


def _uneven_batches(cfg, *, labelled=(3, 30)):
    """One step's global batch: two micro-batches of 1 x 32 tokens holding 3 and 30 labels."""
    gen = torch.Generator().manual_seed(7)
    batch = []
    for n in labelled:
        ids = torch.randint(0, cfg.model.vocab_size, (1, 32), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, :n] = torch.roll(ids, -1, dims=1)[:, :n]
        batch.append({"input_ids": ids, "labels": labels, "token_mask": torch.ones_like(ids, dtype=torch.bool)})
    return [batch]


@pytest.mark.parametrize("dp_mode", ["replicate", "fsdp"])
def test_dp_ranks_with_3_and_30_labels_match_the_union(corpus_cache, tmp_path, dp_mode):
    """Token-weighted loss: dp=2 with 3 and 30 labelled tokens == one process on the union."""
    cfg = layout_config(corpus_cache, str(tmp_path), **{"data.seq_length": 32, "data.global_batch_size": 2,
                                                        "model.num_layers": 2})
    batches = _uneven_batches(cfg)
    reference = run_single(cfg, num_steps=1, batches=batches)
    layout = Layout(f"dp2-{dp_mode}", dp=2, dp_mode=dp_mode)
    ranks = run_layouts(cfg, [layout], num_steps=1, batches=batches, timeout_s=120)[layout.name]
    for run in ranks:
        assert max_relative_difference(run.losses, reference.losses) <= RTOL, (run.losses, reference.losses)
        assert max_relative_difference(run.grad_norms, reference.grad_norms) <= RTOL
