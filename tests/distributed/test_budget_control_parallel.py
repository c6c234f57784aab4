"""Budget control and the load-balance loss under data parallelism (gloo, 2 and 4 processes).

For one global batch of four 1 x 16 micro-batches (identical micro-batches in every layout, so T of
Eq. 3-5 is the same):

- the expert-bias trajectory of dp 2 (x 2 micro-batches of 1, or x 1 micro-batch of 2) is bitwise
  that of one process running the batch as 1 x 4 (and as 4 x 1,
  tests/integration/test_budget_control.py), on both ranks;
- the load-balance loss's gradient at the router (after the dp gradient sum) is the same at dp 1,
  2 and 4;
- R_g, the automatic alpha and every stability metric are identical on all ranks; measuring R_g
  changes no training number (dp 2 replicate, ep 2, FSDP2);
- under pp 2 the stages compute the load-balance loss with the alpha the trainer holds at that step
  (``StabilityMonitor.lb_coef``, which ``moe.auto_lb_coef`` moves between steps), as one process does;
- under pp 2 (1F1B and ZB-V) ``moe.auto_lb_coef`` measures R_g per stage (an isolated LM-only pass
  through the stages) and gives one process's R_g per layer, alpha, losses and grad norms over 3 steps,
  identically on both ranks;
- under pp 2 x dp 2 with FSDP2 (every stage an FSDP root; 1F1B and ZB-V) the isolated pass runs
  through the stage roots' hooks: R_g, alpha, losses and grad norms are dp 2 FSDP2's (R_g measured on
  each dp rank's first micro-batch, summed over dp), and one process's when both dp ranks hold the
  same micro-batches (then the dp sum scales both parts of the ratio alike); measuring R_g changes
  no training number there (losses, grad norms, parameters bitwise).

The layouts' own equivalence (losses, grad norms, biases, parameters for tp/pp/ep/fsdp/...) is
tests/distributed/test_layouts.py; this file adds what it does not check. Rank bodies are
module-level functions so that spawn can pickle them.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config
from longcat.testing import run_distributed
from longcat.testing.equivalence import Layout, run_single
from longcat.train import losses

NUM_STEPS = 3
ALPHA = 0.05
RTOL = 1e-5


def _cfg(corpus_cache: str, **extra):
    overrides = {"data.seq_length": 16, "data.micro_batch_size": 1, "data.global_batch_size": 4,
                 "train.eval_interval": 0, "train.checkpoint_interval": 0, "moe.bias_update_rate": 0.2,
                 "moe.lb_loss_coef": ALPHA, **extra}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, "unused", **overrides))
    return cfg


def _global_batches(num_steps: int) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(num_steps):
        batch = []
        for _ in range(4):
            ids = torch.randint(0, 512, (1, 16), generator=gen)
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = losses.IGNORE_INDEX
            batch.append({"input_ids": ids, "labels": labels, "token_mask": torch.ones_like(ids, dtype=torch.bool)})
        steps.append(batch)
    return steps


def _trainer(cfg, layout: Layout):
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.trainer import Trainer

    cfg = layout.apply(cfg)
    groups = None
    if dist.is_initialized():
        groups = ProcessGroups.build(ParallelDims.from_config(layout.parallel, world_size=dist.get_world_size()))
    validate_run_config(cfg, world_size=groups.world_size if groups else 1)
    cfg.train.out_dir = tempfile.mkdtemp(prefix="budget_")
    return Trainer(cfg, groups=groups)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _share(trainer, batch: list[dict]) -> list[dict]:
    per_rank = len(batch) // trainer.dp_size
    return batch[trainer.dp_rank * per_rank:(trainer.dp_rank + 1) * per_rank]


def lb_router_grads(cfg, layout: Layout, batch: list[dict]) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Per layer (global id) of this rank, the LB term's gradient at its router's weight, summed over
    dp: grad(alpha) - grad(0); and the step's ``loss/lb`` at alpha 0 and ALPHA. alpha is set on the
    stability monitor between the two passes, where the automatic alpha lands."""
    trainer = _trainer(cfg, layout)
    mbs = _share(trainer, batch)
    layer_ids = trainer.pipeline.local_layer_ids if trainer.pipeline is not None else range(len(trainer.routers_L))
    grads, lb_losses = [], []
    for alpha in (0.0, ALPHA):
        trainer.stability.lb_coef = alpha
        trainer.parallel.zero_grad(trainer.optimizer)
        parts, _ = trainer._forward_backward_all(mbs, trainer._global_counts(mbs))
        if trainer.parallel.grad_sync is not None:
            trainer.parallel.grad_sync.sync()  # [param] -> all_reduce(sum, dp) -> [param]
        grads.append([r.classifier.weight.grad.flatten().clone() for r in trainer.routers_L])
        lb_losses.append(parts.lb)
    return {layer: g1 - g0 for layer, g0, g1 in zip(layer_ids, *grads)}, lb_losses


def lb_router_grad(cfg, layout: Layout, batch: list[dict]) -> torch.Tensor:
    """``lb_router_grads`` of every layer of this rank, concatenated in layer order."""
    by_layer, _ = lb_router_grads(cfg, layout, batch)
    return torch.cat([by_layer[layer] for layer in sorted(by_layer)])


def train_run(cfg, layout: Layout, steps: list[list[dict]]) -> dict:
    """Train on ``steps``: per step the biases, loss, grad norm and stability metrics of this rank."""
    trainer = _trainer(cfg, layout)
    out = {"biases": [], "losses": [], "grad_norms": [], "stability": []}
    for batch in steps:
        result = trainer.train_step(_share(trainer, batch))
        out["biases"].append([b.detach().clone() for b in trainer.biases_L])
        out["losses"].append(result.loss.total)
        out["grad_norms"].append(result.grad_norm)
        out["stability"].append(result.stability)
    out["state"] = trainer.trainer_state()["stability"]
    out["params"] = [_local(p).detach().clone() for p in trainer.model.parameters()]
    return out


def _pairs(steps: list[list[dict]]) -> list[list[dict]]:
    """The same global batches as 2 x 16 micro-batches (rows 0-1 and 2-3)."""
    return [[{k: torch.cat([a[k], b[k]]) for k in a} for a, b in (batch[0:2], batch[2:4])] for batch in steps]


def _world2_body(cfg_lb0, cfg_lb0_mb2, cfg_health, cfg_auto, steps) -> dict:
    dp2 = Layout("dp2", dp=2)
    return {
        "trajectory": train_run(cfg_lb0, dp2, steps),
        "trajectory_mb2": train_run(cfg_lb0_mb2, dp2, _pairs(steps)),
        "lb_grad": lb_router_grad(cfg_health, dp2, steps[0]),
        "lb_grads_pp2": lb_router_grads(cfg_health, Layout("pp2", pp=2), steps[0]),
        "auto": train_run(cfg_auto, dp2, steps),
        "auto_pp2": train_run(cfg_auto, Layout("pp2", pp=2), steps),
        "auto_pp2_zbv": train_run(_four_layers(cfg_auto), Layout("pp2zbv", pp=2, pp_schedule="zbv"), steps),
        "auto_fsdp": train_run(cfg_auto, DP2_FSDP, steps),
        "auto_fsdp_4l": train_run(_four_layers(cfg_auto), DP2_FSDP, steps),
        "auto_ep2_ckpt": train_run(_checkpointed(cfg_auto), Layout("ep2", dp=2, ep=2), steps),
        "ep2_on": train_run(cfg_health, Layout("ep2", dp=2, ep=2), steps[:2]),
        "ep2_off": train_run(_health_off(cfg_health), Layout("ep2", dp=2, ep=2), steps[:2]),
        "fsdp_on": train_run(cfg_health, DP2_FSDP, steps[:2]),
        "fsdp_off": train_run(_health_off(cfg_health), DP2_FSDP, steps[:2]),
    }


DP2_FSDP = Layout("fsdp", dp=2, dp_mode="fsdp")
PP2_DP2_FSDP = {"1f1b": Layout("pp2xdp2-fsdp", pp=2, dp=2, dp_mode="fsdp"),
                "zbv": Layout("pp2xdp2-fsdp-zbv", pp=2, dp=2, dp_mode="fsdp", pp_schedule="zbv")}


def _mirrored(steps: list[list[dict]]) -> list[list[dict]]:
    """Global batches whose two dp halves are the same micro-batches (0, 1, 0, 1)."""
    return [batch[:2] + batch[:2] for batch in steps]


def _pp_fsdp_body(cfg_auto, cfg_health, steps) -> dict:
    out = {}
    for schedule, layout in PP2_DP2_FSDP.items():
        cfg = _four_layers(cfg_auto) if schedule == "zbv" else cfg_auto  # ZB-V: 4 stages of one layer
        out[schedule] = train_run(cfg, layout, steps)
        out[f"{schedule}_mirrored"] = train_run(cfg, layout, _mirrored(steps))
    out["health_on"] = train_run(cfg_health, PP2_DP2_FSDP["1f1b"], steps[:2])
    out["health_off"] = train_run(_health_off(cfg_health), PP2_DP2_FSDP["1f1b"], steps[:2])
    return out


def _health_off(cfg):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.moe.router_health_interval = 0
    return cfg


def _four_layers(cfg):
    """``cfg`` with 4 layers: ZB-V at pp 2 runs 4 stages (stage 0 and 3 on rank 0)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.num_layers = 4
    return cfg


def _checkpointed(cfg):
    """``cfg`` with activation checkpointing (the router probabilities R_g reads are recomputed)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.activation_checkpointing = True
    return cfg


def _pp_ep_auto_body(cfg, steps) -> dict:
    return train_run(_checkpointed(cfg), Layout("pp2xep2", pp=2, dp=2, ep=2), steps)


def _world4_body(cfg, batch) -> torch.Tensor:
    return lb_router_grad(cfg, Layout("dp4", dp=4), batch)


@pytest.fixture(scope="module")
def setup(corpus_cache):
    steps = _global_batches(NUM_STEPS)
    cfgs = {
        "lb0": _cfg(corpus_cache, **{"moe.lb_loss_coef": 0.0, "moe.router_health_interval": 0}),
        "lb0_mb2": _cfg(corpus_cache, **{"moe.lb_loss_coef": 0.0, "moe.router_health_interval": 0,
                                         "data.micro_batch_size": 2}),
        "health": _cfg(corpus_cache, **{"moe.router_health_interval": 1}),
        "auto": _cfg(corpus_cache, **{"moe.router_health_interval": 1, "moe.auto_lb_coef": True,
                                      "moe.rg_threshold": 0.05}),
    }
    return steps, cfgs


@pytest.fixture(scope="module")
def pp_fsdp(setup):
    steps, cfgs = setup
    return run_distributed(_pp_fsdp_body, world_size=4, args=(cfgs["auto"], cfgs["health"], steps), timeout_s=300)


@pytest.fixture(scope="module")
def world2(setup):
    steps, cfgs = setup
    ranks = run_distributed(_world2_body, world_size=2,
                            args=(cfgs["lb0"], cfgs["lb0_mb2"], cfgs["health"], cfgs["auto"], steps), timeout_s=240)
    return ranks


@pytest.mark.parametrize("run", ["trajectory", "trajectory_mb2"])
def test_dp2x2_bias_trajectory_equals_one_process_1x4(setup, world2, run):
    """dp 2 x (2 micro-batches of 1 | 1 micro-batch of 2) == one process, 4 micro-batches of 1."""
    steps, cfgs = setup
    reference = run_single(cfgs["lb0"], num_steps=NUM_STEPS, batches=steps)  # 1 x 4 in this process
    for rank in world2:
        for step in range(NUM_STEPS):
            for layer, bias in enumerate(rank[run]["biases"][step]):
                assert torch.equal(bias, reference.biases[step][layer]), (step, layer)
    assert any(b.abs().sum() > 0 for b in reference.biases[-1].values())


def test_lb_router_gradient_same_at_dp_1_2_4(setup, world2):
    steps, cfgs = setup
    dp1 = lb_router_grad(cfgs["health"], Layout("single"), steps[0])
    dp4 = run_distributed(_world4_body, world_size=4, args=(cfgs["health"], steps[0]), timeout_s=180)
    assert dp1.norm() > 0
    for name, grads in (("dp2", [r["lb_grad"] for r in world2]), ("dp4", dp4)):
        for rank, g in enumerate(grads):
            torch.testing.assert_close(g, dp1, rtol=RTOL, atol=RTOL * dp1.abs().max().item(), msg=f"{name} {rank}")


def test_stability_state_and_metrics_identical_on_all_ranks(world2):
    for run in ("auto", "trajectory", "ep2_on"):
        a, b = world2[0][run], world2[1][run]
        assert a["stability"] == b["stability"], run
        assert a["state"] == b["state"], run
        for step_a, step_b in zip(a["biases"], b["biases"]):
            assert all(torch.equal(x, y) for x, y in zip(step_a, step_b)), run
    auto = world2[0]["auto"]
    alphas = [m["moe/lb_coef"] for m in auto["stability"]]
    assert alphas[0] == ALPHA and alphas[-1] < ALPHA, alphas  # the automatic alpha moved, on both ranks
    assert all("moe/layer1/rg" in m for m in auto["stability"])


def test_pp2_stages_use_the_alpha_in_use(setup, world2):
    """The pipeline stages read the trainer's current alpha at every step (a fixed moe.lb_loss_coef
    would give the same LB loss and gradient for both alphas): at 0 and at ALPHA the load-balance
    loss and its gradient at every router are one process's."""
    steps, cfgs = setup
    want_grads, want_lb = lb_router_grads(cfgs["health"], Layout("single"), steps[0])
    assert want_lb[0] == 0.0 and want_lb[1] > 0
    layers = set()
    for rank in world2:
        grads, lb = rank["lb_grads_pp2"]
        assert lb[0] == 0.0 and lb[1] == pytest.approx(want_lb[1], rel=RTOL), (lb, want_lb)
        for layer, g in grads.items():
            want = want_grads[layer]
            assert want.norm() > 0
            torch.testing.assert_close(g, want, rtol=RTOL, atol=RTOL * want.abs().max().item(), msg=f"layer {layer}")
        layers |= set(grads)
    assert layers == set(want_grads)  # the two stages hold every layer


@pytest.mark.parametrize("run", ["auto_pp2", "auto_pp2_zbv"])
def test_pp2_automatic_alpha_matches_one_process(setup, world2, run):
    """moe.auto_lb_coef under pp 2: R_g of every layer (global index), the alpha it sets, the losses and
    the grad norms of 3 steps are one process's (which moves alpha), the same on both ranks."""
    steps, cfgs = setup
    want = train_run(_four_layers(cfgs["auto"]) if run.endswith("zbv") else cfgs["auto"], Layout("single"), steps)
    alphas = [m["moe/lb_coef"] for m in want["stability"]]
    assert alphas[0] == ALPHA and alphas[-1] < ALPHA, alphas  # the reference's alpha moved
    for a, b in zip(world2[0][run]["stability"], world2[1][run]["stability"]):  # the rest is per stage
        assert {k: v for k, v in a.items() if "rg" in k or "lb_coef" in k} == {
            k: v for k, v in b.items() if "rg" in k or "lb_coef" in k}
    for rank in world2:
        _assert_same_budget_control(rank[run], want, rg_rtol=1e-4)


def test_pp2xep2_automatic_alpha_matches_dp2xep2(setup, world2):
    """pp 2 x dp 2 x ep 2 with activation checkpointing: the isolated pass runs the EP all-to-alls and
    the recomputed routers of each stage; R_g, alpha, losses and grad norms are dp 2 x ep 2's (the same
    LB groups and micro-batch split, no pipeline), on all four ranks alike."""
    steps, cfgs = setup
    want = world2[0]["auto_ep2_ckpt"]
    assert [m["moe/lb_coef"] for m in want["stability"]][-1] < ALPHA
    for got in run_distributed(_pp_ep_auto_body, world_size=4, args=(cfgs["auto"], steps), timeout_s=240):
        assert got["losses"] == pytest.approx(want["losses"], rel=RTOL)
        assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=RTOL)
        for g, w in zip(got["stability"], want["stability"]):
            for key in [k for k in w if k.endswith("/rg")] + ["moe/rg_max", "moe/lb_coef"]:
                assert g[key] == pytest.approx(w[key], rel=1e-4), (key, g[key], w[key])


@pytest.mark.parametrize("layout", ["ep2", "fsdp"])
def test_measuring_rg_changes_nothing(world2, layout):
    """The extra autograd.grad before the real backward runs through the EP all-to-alls' and FSDP2's
    backward hooks; the real gradients, hence the training, are bitwise unchanged."""
    for rank in world2:
        on, off = rank[f"{layout}_on"], rank[f"{layout}_off"]
        assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"]
        assert all(torch.equal(p, q) for p, q in zip(on["params"], off["params"]))
        assert "moe/layer0/rg" in on["stability"][0] and "moe/layer0/rg" not in off["stability"][0]
    assert world2[0][f"{layout}_on"]["stability"] == world2[1][f"{layout}_on"]["stability"]


def _assert_same_budget_control(got: dict, want: dict, *, rg_rtol: float) -> None:
    """Losses and grad norms to RTOL; per step every layer's R_g, the worst, and alpha to ``rg_rtol``: each R_g
    to ``rg_rtol`` of itself or of the step's worst R_g, whichever is larger. A layer whose load-balance
    gradient is at rounding level (R_g 0.0 in one process, 5.8e-9 under pp x FSDP2 at step 2, where the
    other layer had 0.037) has no relative agreement to check, and only the worst R_g sets alpha."""
    assert got["losses"] == pytest.approx(want["losses"], rel=RTOL)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=RTOL)
    assert got["state"]["lb_coef"] == pytest.approx(want["state"]["lb_coef"], rel=rg_rtol)
    for step, (g, w) in enumerate(zip(got["stability"], want["stability"])):
        rg = sorted(k for k in w if k.endswith("/rg"))
        assert rg and rg == sorted(k for k in g if k.endswith("/rg")), (step, rg)
        for key in rg + ["moe/rg_max", "moe/lb_coef"]:
            floor = rg_rtol * w["moe/rg_max"] if key.endswith("/rg") else 0.0
            assert g[key] == pytest.approx(w[key], rel=rg_rtol, abs=floor), (step, key, g[key], w[key])


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_pp2xdp2_fsdp_automatic_alpha_matches_one_process(setup, pp_fsdp, schedule):
    """moe.auto_lb_coef under pp 2 x dp 2 with FSDP2: the isolated LM-only pass runs through the stage
    roots' hooks (gathered weights, no gradient reduced). With the same micro-batches on both dp ranks,
    R_g of every layer, the alpha it sets, the losses and grad norms of 3 steps are one process's
    (which moves alpha), on all four ranks: losses and grad norms to 1e-5, R_g and alpha to 1e-4 as in
    the other pipeline comparisons (R_g is a ratio of two norms of an isolated pass; under ZB-V on a
    Xeon with AVX-512/AMX kernels it differed from one process's by 2.2e-5)."""
    steps, cfgs = setup
    cfg = _four_layers(cfgs["auto"]) if schedule == "zbv" else cfgs["auto"]
    want = train_run(cfg, Layout("single"), _mirrored(steps))
    alphas = [m["moe/lb_coef"] for m in want["stability"]]
    assert alphas[0] == ALPHA and alphas[-1] < ALPHA, alphas  # the reference's alpha moved
    for rank in pp_fsdp:
        _assert_same_budget_control(rank[f"{schedule}_mirrored"], want, rg_rtol=1e-4)


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_pp2xdp2_fsdp_automatic_alpha_matches_dp2_fsdp(pp_fsdp, world2, schedule):
    """The same with different micro-batches on the two dp ranks: R_g is measured on each dp rank's
    first micro-batch and summed over dp, as dp 2 FSDP2 without a pipeline does; R_g, alpha, losses
    and grad norms are that run's, and every rank applies the same alpha."""
    want = world2[0]["auto_fsdp_4l" if schedule == "zbv" else "auto_fsdp"]
    assert [m["moe/lb_coef"] for m in want["stability"]][-1] < ALPHA
    for rank in pp_fsdp:
        _assert_same_budget_control(rank[schedule], want, rg_rtol=1e-4)
    first = {k: v for k, v in pp_fsdp[0][schedule]["stability"][-1].items() if "rg" in k or "lb_coef" in k}
    for rank in pp_fsdp[1:]:
        assert {k: v for k, v in rank[schedule]["stability"][-1].items() if k in first} == first


def test_pp2xdp2_fsdp_measuring_rg_changes_nothing(pp_fsdp):
    """The isolated pass gathers every stage's weights through FSDP2's hooks and reshards them, and
    reduces no gradient: the training's gradients, hence losses, grad norms and parameters, are
    bitwise those of a run that never measures R_g."""
    for rank in pp_fsdp:
        on, off = rank["health_on"], rank["health_off"]
        assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"]
        assert all(torch.equal(p, q) for p, q in zip(on["params"], off["params"]))
        assert any(k.endswith("/rg") for k in on["stability"][0])
        assert not any(k.endswith("/rg") for k in off["stability"][0])
