"""SDC checks and the non-finite guard on two data-parallel ranks (dp=2, replicate).

- A fault campaign: parameter faults on either rank (dense weights, routed experts) are found by the
  cross-replica check right after the optimizer step; activation and gradient faults on rank 1 by
  rank 1's replay. Every rank learns of every mismatch. After each parameter fault the test flips the
  bit back, so the replicas agree again and a lingering divergence would show as a false alarm.
- ``sdc.policy=rollback`` with a replica check every 2 steps and a checkpoint every step: a fault
  after step 3's optimizer is found at step 4, the checkpoint of step 3 (written from the corrupt
  state) is set aside as ``.suspect``, the run continues from step 2 and ends bitwise on the clean run;
  with ``halt`` both ranks stop there, the same checkpoint set aside.
- A NaN loss on rank 1 only: both ranks skip the step (parameters, AdamW moments, LR, expert bias
  untouched), in fp32 and under bf16 autocast; with ``abort`` both ranks stop and nothing is saved;
  a non-finite parameter on rank 1 makes both ranks refuse the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.schema import FaultInjection
from longcat.config.validate import validate as validate_run_config
from longcat.testing.distributed import run_distributed

CHECKS = {"determinism.enabled": "true", "sdc.replay_interval": 1, "sdc.replica_interval": 1}

# (target, tensor, rank, bit)
CAMPAIGN = [
    ("parameter", "model.embed_tokens.weight", 0, 0),
    ("parameter", "model.layers.0.self_attn.1.kv_b_proj.weight", 1, 13),
    ("parameter", "model.layers.1.mlp.experts.gate_proj", 0, 31),
    ("parameter", "model.layers.0.mlp.experts.up_proj", 1, 7),
    ("parameter", "lm_head.weight", 1, 22),
    ("parameter", "model.norm.weight", 0, 29),
    ("parameter", "model.layers.1.mlps.1.up_proj.weight", 1, 3),
    ("parameter", "model.layers.0.mlp.router.classifier.weight", 0, 18),
    ("activation", "model.layers.1.mlps.0.down_proj", 1, 20),
    ("activation", "model.layers.0.self_attn.1.o_proj", 1, 26),
    ("gradient", "model.layers.0.mlp.experts.gate_proj", 1, 5),
    ("gradient", "model.layers.1.self_attn.0.q_a_proj.weight", 1, 11),
]


def _cfg(corpus_cache: str, out_dir: str, **extra):
    cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, out_dir, **{"parallel.dp": 2, **extra}))
    validate_run_config(cfg, world_size=2)
    return cfg, cfg_dict


def _trainer(cfg, cfg_dict=None):
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.trainer import Trainer

    return Trainer(cfg, groups=ProcessGroups.build(ParallelDims(dist.get_world_size(), dp=2)), config_dict=cfg_dict)


# ------------------------------------------------------------------------------------ campaign
def _campaign(cfg, campaign) -> dict:
    from longcat.train.sdc import flip_bit_

    trainer = _trainer(cfg)
    trainer.train_step()
    detected = []
    for i, (target, tensor, rank, bit) in enumerate(campaign):
        step = trainer.step + 1
        fault = FaultInjection(step=step, rank=rank, target=target, tensor=tensor, index=100 + 37 * i, bit=bit)
        trainer.sdc.arm(fault)
        trainer.train_step()
        detected.append([m for m in trainer.sdc.mismatches if m.step == step])
        if target == "parameter" and dist.get_rank() == rank:  # repair: the replicas agree again
            flip_bit_(dict(trainer.model.named_parameters())[tensor].data, index=fault.index, bit=bit)
    trainer.train_step()  # a clean step at the end
    return {"detected": detected, "all_steps": sorted({m.step for m in trainer.sdc.mismatches})}


def _rollback_run(cfg, cfg_dict, fault: FaultInjection | None):
    from longcat.testing.equivalence import gather_global_params

    trainer = _trainer(cfg, cfg_dict)
    if fault is not None:
        trainer.sdc.arm(fault)
    trainer.fit()
    return {"step": trainer.step, "mismatches": list(trainer.sdc.mismatches),
            "params": gather_global_params(trainer.parallel)}


def _sdc_worker(corpus_cache: str, tmp: str) -> dict:
    from longcat.train.sdc_check import SDCHaltError

    out = {"campaign": _campaign(_cfg(corpus_cache, f"{tmp}/campaign", **CHECKS, **{"train.steps": 40})[0], CAMPAIGN)}
    rollback = {**CHECKS, "sdc.replica_interval": 2, "sdc.policy": "rollback", "train.steps": 6,
                "train.checkpoint_interval": 1, "train.keep_last": 10, "train.eval_interval": 0}
    fault = FaultInjection(step=3, rank=1, target="parameter", tensor="model.layers.0.mlps.0.up_proj.weight", bit=27)
    out["clean"] = _rollback_run(*_cfg(corpus_cache, f"{tmp}/clean", **rollback), None)
    out["rolled"] = _rollback_run(*_cfg(corpus_cache, f"{tmp}/rolled", **rollback), fault)
    try:
        _rollback_run(*_cfg(corpus_cache, f"{tmp}/halted", **{**rollback, "sdc.policy": "halt"}), fault)
        out["halted"] = None
    except SDCHaltError as e:
        out["halted"] = str(e)
    return out


@pytest.fixture(scope="module")
def sdc_runs(corpus_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdc")
    return run_distributed(_sdc_worker, world_size=2, args=(corpus_cache, str(tmp)), timeout_s=300), tmp


def test_every_injected_fault_is_detected_on_every_rank(sdc_runs):
    per_rank, _ = sdc_runs
    for rank, out in enumerate(per_rank):
        detected = out["campaign"]["detected"]
        for (target, tensor, fault_rank, bit), found in zip(CAMPAIGN, detected):
            assert found, f"rank {rank}: {target} fault in {tensor} (rank {fault_rank}, bit {bit}) went undetected"
            if target == "parameter":  # two replicas: the report names the pair's higher rank
                assert [(m.check, m.tensor, m.rank) for m in found] == [("replica", tensor, 1)]
            else:
                assert all(m.check == "replay" and m.rank == fault_rank for m in found)
            if target == "gradient":
                assert [m.tensor for m in found] == [tensor]
        fault_steps = [found[0].step for found in detected]
        assert out["campaign"]["all_steps"] == fault_steps, "a false alarm outside the injected steps"
    assert per_rank[0]["campaign"]["detected"] == per_rank[1]["campaign"]["detected"]


def test_rollback_sets_the_suspect_checkpoint_aside_and_recovers(sdc_runs):
    per_rank, tmp = sdc_runs
    for out in per_rank:
        clean, rolled = out["clean"], out["rolled"]
        assert clean["mismatches"] == [] and clean["step"] == rolled["step"] == 6
        # found by the check right before step 3's checkpoint, not by the periodic one at step 4
        assert [(m.step, m.check, m.tensor) for m in rolled["mismatches"]] == [
            (3, "replica", "model.layers.0.mlps.0.up_proj.weight")]
        for name, value in clean["params"].items():
            assert torch.equal(value, rolled["params"][name]), name
    checkpoints = Path(tmp) / "rolled" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names[-1] == "step_00000006" and not [n for n in names if n.endswith(".suspect")], names  # none written


def test_halt_stops_both_ranks_and_sets_the_suspect_checkpoint_aside(sdc_runs):
    """Replica check every 2 steps, checkpoint every step, a fault at step 3: the replicas are compared
    right before step 3's checkpoint, so it is never written; halting leaves step 2 for a resume."""
    per_rank, tmp = sdc_runs
    for out in per_rank:
        assert "replica check at step 3" in out["halted"] and "no checkpoint written" in out["halted"]
    checkpoints = Path(tmp) / "halted" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002"]


# ------------------------------------------------------------------------------------ non-finite
def _nan_on_rank1_at(trainer, step: int):
    """A forward hook that makes rank 1's final hidden state (hence its logits and loss) NaN while computing
    ``step`` (on the final norm: the fused head + CE never calls the ``lm_head`` module)."""

    def hook(_module, _inputs, output):
        if dist.get_rank() == 1 and trainer.step + 1 == step:
            return output * float("nan")
        return None

    return trainer.model.model.norm.register_forward_hook(hook)


def _state(trainer) -> dict:
    opt = trainer.optimizer.state
    return {"params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "moments": [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), float(s["step"])) for s in opt.values()],
            "lr": trainer.optimizer.param_groups[0]["lr"], "last_epoch": trainer.scheduler.last_epoch,
            "bias_updates": trainer.controller.num_updates}


def _same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
            and all(torch.equal(x, y) for ma, mb in zip(a["moments"], b["moments"]) for x, y in zip(ma[:2], mb[:2]))
            and [m[2] for m in a["moments"]] == [m[2] for m in b["moments"]]
            and (a["lr"], a["last_epoch"], a["bias_updates"]) == (b["lr"], b["last_epoch"], b["bias_updates"]))


def _skip_run(cfg) -> dict:
    from longcat.train.nonfinite import NonFiniteCheckpointError

    trainer = _trainer(cfg)
    _nan_on_rank1_at(trainer, 3)
    results = [trainer.train_step(), trainer.train_step()]
    before = _state(trainer)
    results.append(trainer.train_step())  # step 3: NaN on rank 1
    after_skip = _state(trainer)
    results.append(trainer.train_step())
    out = {"losses": [r.loss.total for r in results], "norms": [r.grad_norm for r in results],
           "untouched": _same(before, after_skip), "moved_after": not _same(after_skip, _state(trainer)),
           "skipped": trainer.guard.num_skipped,
           "metric": trainer.step_metrics(results[-1], 1.0)["nonfinite/skipped_steps"],
           "bias_moved": before["bias_updates"] != after_skip["bias_updates"]}
    if dist.get_rank() == 1:  # a non-finite parameter on one rank: every rank refuses the checkpoint
        trainer.model.model.norm.weight.data[0] = float("nan")
    try:
        trainer.save_checkpoint()
        out["refused"] = None
    except NonFiniteCheckpointError as e:
        out["refused"] = str(e)
    return out


def _nonfinite_worker(corpus_cache: str, tmp: str) -> dict:
    from longcat.train.nonfinite import NonFiniteError

    out = {}
    for name, extra in (("fp32", {}), ("bf16", {"train.bf16": "true"})):
        out[name] = _skip_run(_cfg(corpus_cache, f"{tmp}/{name}", **extra)[0])
    cfg, cfg_dict = _cfg(corpus_cache, f"{tmp}/abort", **{"train.nonfinite_policy": "abort", "train.steps": 4,
                                                          "train.checkpoint_interval": 1, "train.eval_interval": 0})
    trainer = _trainer(cfg, cfg_dict)
    _nan_on_rank1_at(trainer, 2)
    try:
        trainer.fit()
        out["abort"] = None
    except NonFiniteError as e:
        out["abort"] = (str(e), trainer.step)
    return out


@pytest.fixture(scope="module")
def nonfinite_runs(corpus_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    return run_distributed(_nonfinite_worker, world_size=2, args=(corpus_cache, str(tmp)), timeout_s=300), tmp


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_on_one_rank_skips_the_step_on_every_rank(nonfinite_runs, precision):
    per_rank, _ = nonfinite_runs
    for rank, runs in enumerate(per_rank):
        run = runs[precision]
        assert run["skipped"] == 1 and run["metric"] == 1, rank
        assert run["untouched"], f"rank {rank}: the skipped step changed the training state"
        assert not run["bias_moved"] and run["moved_after"]
        losses, norms = run["losses"], run["norms"]
        assert all(x == x for x in losses[:2] + losses[3:]) and all(x == x for x in norms[:2] + norms[3:])
        assert norms[2] != norms[2]  # the NaN reached the global grad norm on both ranks
    assert per_rank[0][precision]["norms"][3] == per_rank[1][precision]["norms"][3]


def test_checkpoint_with_a_nonfinite_tensor_on_one_rank_is_refused_everywhere(nonfinite_runs):
    per_rank, _ = nonfinite_runs
    for runs in per_rank:
        assert "rank 1: model.model.norm.weight" in runs["fp32"]["refused"]


def test_abort_stops_every_rank_without_a_checkpoint_of_the_bad_step(nonfinite_runs):
    per_rank, tmp = nonfinite_runs
    for runs in per_rank:
        message, step = runs["abort"]
        assert "non-finite" in message and "step 2" in message and step == 1
    assert sorted(p.name for p in (Path(tmp) / "abort" / "checkpoints").iterdir()) == ["step_00000001"]
