"""``determinism.enabled`` under ep2, tp2, pp2 (and dp2-fsdp): two runs of 5 steps give the same bits.

Each layout runs twice, one after the other, in the same two gloo processes (start-up dominates on
CPU): per step the loss and the grad norm, and the final parameters gathered to global tensors, must
be bitwise identical between the two runs, and identical on both ranks. Each rank also draws from
its process-wide stream after the trainer is built: the two ranks' numbers must differ.

The SDC checks run in the same runs and must stay silent: the replay every step under ep2 and tp2
(its forward and backward hold the all-to-alls and TP collectives: every rank replays at the same
step), the cross-replica check every step everywhere (pp2: per stage; ep2: dense weights over dp).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.testing.distributed import run_distributed
from longcat.testing.equivalence import Layout

NUM_STEPS = 5
# dp2-fsdp: FSDP2 reduce-scatters inside each backward; the replay's stash / add-back must hold there too.
LAYOUTS = [Layout("ep2", dp=2, ep=2), Layout("tp2", tp=2), Layout("pp2", pp=2),
           Layout("dp2-fsdp", dp=2, dp_mode="fsdp")]


def _run_twice(cfg, layouts: list[Layout]) -> dict[str, list[dict]]:
    """On every rank: each layout twice, returning per run losses, grad norms, params and a random draw."""
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.testing.equivalence import gather_global_params
    from longcat.train.trainer import Trainer

    out: dict[str, list[dict]] = {}
    for layout in layouts:
        run_cfg = layout.apply(cfg)
        run_cfg.sdc.replay_interval = 0 if layout.parallel.pp > 1 else 1  # no replay under PP (SDCConfig)
        run_cfg.sdc.replica_interval = 1
        groups = ProcessGroups.build(ParallelDims.from_config(layout.parallel, world_size=dist.get_world_size()))
        validate_run_config(run_cfg, world_size=groups.world_size)
        runs = []
        for _ in range(2):
            trainer = Trainer(run_cfg, groups=groups)
            draw = torch.rand(4)  # the per-rank stream, right after the (identical) initialisation
            results = [trainer.train_step() for _ in range(NUM_STEPS)]
            runs.append({"losses": [r.loss.total for r in results], "grad_norms": [r.grad_norm for r in results],
                         "params": gather_global_params(trainer.parallel), "draw": draw,
                         "deterministic": torch.are_deterministic_algorithms_enabled(),
                         "sdc_mismatches": list(trainer.sdc.mismatches)})
            dist.barrier()
        out[layout.name] = runs
    return out


@pytest.fixture(scope="module")
def runs(corpus_cache, tmp_path_factory):
    overrides = {"determinism.enabled": "true", "data.seq_length": 16, "data.micro_batch_size": 1,
                 "data.global_batch_size": 4, "model.mtp_num_layers": 1, "loss.z_loss_coef": 1e-4}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(tmp_path_factory.mktemp("det")),
                                                           **overrides))
    per_rank = run_distributed(_run_twice, world_size=2, args=(cfg, LAYOUTS), timeout_s=300)
    return {layout.name: [per_rank[r][layout.name] for r in range(2)] for layout in LAYOUTS}


@pytest.mark.parametrize("layout", [layout.name for layout in LAYOUTS])
def test_two_runs_are_bitwise_identical(runs, layout):
    ranks = runs[layout]
    for rank, (first, second) in enumerate(ranks):
        assert first["deterministic"] and second["deterministic"]
        assert first["sdc_mismatches"] == second["sdc_mismatches"] == [], rank
        assert first["losses"] == second["losses"], (rank, first["losses"], second["losses"])
        assert first["grad_norms"] == second["grad_norms"], rank
        assert first["params"].keys() == second["params"].keys()
        for name, value in first["params"].items():
            assert torch.equal(value, second["params"][name]), (rank, name)
    assert ranks[0][0]["losses"] == ranks[1][0]["losses"] and ranks[0][0]["grad_norms"] == ranks[1][0]["grad_norms"]


@pytest.mark.parametrize("layout", [layout.name for layout in LAYOUTS])
def test_ranks_draw_distinct_streams(runs, layout):
    (rank0_first, rank0_second), (rank1_first, _) = runs[layout]
    assert torch.equal(rank0_first["draw"], rank0_second["draw"])  # reproducible per rank
    assert not torch.equal(rank0_first["draw"], rank1_first["draw"])  # distinct across ranks
