"""SDC replay under pipeline parallelism and under DeepSpeed (gloo, 2 and 4 processes, tiny model).

- pp 2 (1F1B, and ZB-V with 4 layers: stages 0 and 3 on rank 0): the chosen micro-batch (index 1 of
  4) runs twice on its own through the stages; activation faults (a bit of a module's output) and
  gradient faults (a bit of a parameter's gradient) injected on either stage are found at the
  step they were injected, on every rank, and a gradient fault is reported under exactly the
  parameter it hit. A fault in stage 0 also changes what stage 1 computes from it: the report names
  stage 1's output or input gradient too (per stage checksums).
- pp 2 x dp 2 with FSDP2 (every stage an FSDP root; 1F1B, and ZB-V with 4 layers): the isolated runs
  go through the stage roots' hooks, their gradients reduce-scattered over dp into the (stashed)
  sharded ``.grad``. Activation faults on any rank and gradient faults in a shard of a dense, an
  expert (sharded over edp), the embedding (whole under ZB-V, where stages 0 and 3 share it) and the
  LM head are found at their step on all four ranks, a gradient fault under exactly its parameter.
- dp 2 with DeepSpeed ZeRO-2: activation and gradient faults on either rank are found the same way.
- Replay changes no training number: the losses, grad norms and final parameters of a clean run
  with ``sdc.replay_interval=1`` equal those of a run without replay, bit for bit, and no check
  fails (no false alarm from the isolated passes, the schedule's own forward of the micro-batch
  included).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.schema import FaultInjection
from longcat.config.validate import validate as validate_run_config
from longcat.testing.distributed import run_distributed

STEPS = 3
LAYOUTS = {
    "pp2-1f1b": {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"},
    "pp2-zbv": {"parallel.pp": 2, "parallel.pp_schedule": "zbv", "model.num_layers": 4},
    "pp2xdp2-fsdp-1f1b": {"parallel.pp": 2, "parallel.dp": 2, "parallel.dp_mode": "fsdp",
                          "parallel.pp_schedule": "1f1b"},
    "pp2xdp2-fsdp-zbv": {"parallel.pp": 2, "parallel.dp": 2, "parallel.dp_mode": "fsdp",
                         "parallel.pp_schedule": "zbv", "model.num_layers": 4},
    "dp2-deepspeed-z2": {"parallel.dp": 2, "parallel.dp_mode": "deepspeed", "parallel.zero_stage": 2},
}
WORLD_SIZE = {"pp2xdp2-fsdp-1f1b": 4, "pp2xdp2-fsdp-zbv": 4}  # the others: 2
# per layout: (target, tensor, rank, bit); every tensor lives on the rank named (under pp2 x dp2 ranks
# 0, 1 hold pipeline rank 0's stages, ranks 2, 3 pipeline rank 1's)
CAMPAIGNS = {
    "pp2-1f1b": [
        ("activation", "model.layers.0.mlps.0.down_proj", 0, 20),
        ("activation", "model.layers.1.self_attn.1.o_proj", 1, 26),
        ("gradient", "model.layers.0.mlp.experts.gate_proj", 0, 5),
        ("gradient", "model.embed_tokens.weight", 0, 11),
        ("gradient", "lm_head.weight", 1, 22),
    ],
    "pp2-zbv": [
        ("activation", "model.layers.1.mlps.1.down_proj", 1, 20),
        ("activation", "model.layers.3.self_attn.0.o_proj", 0, 24),
        ("gradient", "model.layers.2.mlp.router.classifier.weight", 1, 9),
    ],
    "pp2xdp2-fsdp-1f1b": [
        ("activation", "model.layers.0.mlps.0.down_proj", 1, 20),
        ("activation", "model.layers.1.self_attn.1.o_proj", 2, 26),
        ("gradient", "model.layers.0.mlp.experts.gate_proj", 0, 5),
        ("gradient", "model.layers.0.self_attn.0.q_a_proj.weight", 1, 11),
        ("gradient", "model.embed_tokens.weight", 0, 11),
        ("gradient", "lm_head.weight", 3, 22),
    ],
    "pp2xdp2-fsdp-zbv": [
        ("activation", "model.layers.1.mlps.1.down_proj", 3, 20),
        ("activation", "model.layers.3.self_attn.0.o_proj", 0, 24),
        ("gradient", "model.layers.2.mlp.router.classifier.weight", 2, 9),
        ("gradient", "model.embed_tokens.weight", 1, 11),
        ("gradient", "lm_head.weight", 0, 22),
    ],
    "dp2-deepspeed-z2": [
        ("activation", "model.layers.1.mlps.0.down_proj", 1, 20),
        ("activation", "model.layers.0.self_attn.1.o_proj", 0, 26),
        ("gradient", "model.layers.0.mlp.experts.gate_proj", 1, 5),
        ("gradient", "model.layers.1.self_attn.0.q_a_proj.weight", 0, 11),
    ],
}


def _cfg(corpus_cache: str, out_dir: str, layout: str, *, replay: int):
    overrides = {**LAYOUTS[layout], "determinism.enabled": "true", "sdc.replay_interval": replay,
                 "sdc.replay_microbatch": 1, "data.global_batch_size": 8, "train.eval_interval": 0,
                 "train.checkpoint_interval": 0}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, out_dir, **overrides))
    validate_run_config(cfg, world_size=WORLD_SIZE.get(layout, 2))
    return cfg


def _trainer(cfg):
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.trainer import Trainer

    dims = ParallelDims.from_config(cfg.parallel, world_size=dist.get_world_size())
    return Trainer(cfg, groups=ProcessGroups.build(dims))


def _clean(cfg) -> dict:
    from longcat.testing.equivalence import gather_global_params

    trainer = _trainer(cfg)
    results = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": [r.loss.total for r in results], "grad_norms": [r.grad_norm for r in results],
            "params": gather_global_params(trainer.parallel), "checks": dict(trainer.sdc.num_checks),
            "mismatches": list(trainer.sdc.mismatches)}


def _campaign(cfg, campaign) -> list:
    trainer = _trainer(cfg)
    detected = []
    for i, (target, tensor, rank, bit) in enumerate(campaign):
        step = trainer.step + 1
        trainer.sdc.arm(FaultInjection(step=step, rank=rank, target=target, tensor=tensor, index=50 + 37 * i, bit=bit))
        trainer.train_step()
        assert trainer.sdc.injector is not None
        detected.append(sorted({m.tensor for m in trainer.sdc.mismatches if m.step == step}))
    return detected


def _worker(corpus_cache: str, tmp: str, layout: str) -> dict:
    return {
        "off": _clean(_cfg(corpus_cache, f"{tmp}/off", layout, replay=0)),
        "on": _clean(_cfg(corpus_cache, f"{tmp}/on", layout, replay=1)),
        "campaign": _campaign(_cfg(corpus_cache, f"{tmp}/campaign", layout, replay=1), CAMPAIGNS[layout]),
    }


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def runs(request, corpus_cache, tmp_path_factory):
    layout = request.param
    tmp = tmp_path_factory.mktemp(layout)
    return layout, run_distributed(_worker, world_size=WORLD_SIZE.get(layout, 2), args=(corpus_cache, str(tmp), layout),
                                   timeout_s=300)


def test_every_injected_fault_is_detected_on_every_rank(runs):
    layout, per_rank = runs
    assert all(out["campaign"] == per_rank[0]["campaign"] for out in per_rank)  # every rank learns of every mismatch
    for (target, tensor, rank, bit), found in zip(CAMPAIGNS[layout], per_rank[0]["campaign"]):
        assert found, f"{layout}: {target} fault in {tensor} (rank {rank}, bit {bit}) went undetected"
        if target == "gradient":
            assert found == [tensor], (layout, tensor, found)
        else:
            assert len(found) > 1, (layout, tensor, found)  # an activation fault spreads to what follows it


def test_pipeline_reports_name_the_stages(runs):
    layout, per_rank = runs
    if not layout.startswith("pp2"):
        pytest.skip("per-stage names are the pipeline's")
    for (target, tensor, _, _), found in zip(CAMPAIGNS[layout], per_rank[0]["campaign"]):
        if target == "activation":
            stages = {name.split("/")[0] for name in found if name.startswith("stage")}
            assert stages, (tensor, found)
    first = CAMPAIGNS[layout][0]
    if layout == "pp2-1f1b":  # stage 0's fault reaches stage 1: its output and stage 0's, also in the schedule
        assert first[1].startswith("model.layers.0.")
        found = per_rank[0]["campaign"][0]
        assert {"stage0/output", "stage1/output", "stage1/input_grad"} <= set(found), found
    if layout == "pp2xdp2-fsdp-1f1b":
        # a fault in dp rank 1's stage 0 reaches its stage 1 (and, reduce-scattered, dp rank 0's gradient shards)
        assert first[1].startswith("model.layers.0.") and first[2] == 1
        found = per_rank[0]["campaign"][0]
        assert {"stage0/output", "stage0/output@schedule", "stage1/input_grad", "stage1/loss"} <= set(found), found


def test_replay_changes_no_training_number(runs):
    layout, per_rank = runs
    for rank, out in enumerate(per_rank):
        on, off = out["on"], out["off"]
        assert on["checks"]["replay"] == STEPS and off["checks"]["replay"] == 0, (rank, on["checks"])
        assert on["mismatches"] == [], (layout, rank, on["mismatches"][:3])
        assert on["losses"] == off["losses"] and on["grad_norms"] == off["grad_norms"], (layout, rank)
        assert on["params"].keys() == off["params"].keys()
        for name, tensor in on["params"].items():
            assert torch.equal(tensor, off["params"][name]), (layout, rank, name)
