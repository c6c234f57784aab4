"""SDC checks under context parallelism (cp=2 x ep=2 on two ranks, deterministic mode).

Each cp rank holds a whole copy of the dense parameters, so the cross-replica check compares them over
dp x cp: a flipped bit in a dense weight on either rank is found right after the optimizer step. The
experts are sharded over ep (folded over the same two ranks), so they have no replica there, and the
replay (the same micro-batch run twice, with the cp collectives inside) finds a fault in a rank's
activations. Under CP a corrupt activation reaches the partner's gradients through the all-gathered
KV latent, so the replay flags the whole cp group (the faulty rank among them): the rollback or halt
covers every rank that saw it. No false alarm on the clean steps around the faults.
"""

from __future__ import annotations

import torch.distributed as dist
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.config.schema import FaultInjection
from longcat.config.validate import validate as validate_run_config
from longcat.testing.distributed import run_distributed

CAMPAIGN = [  # (target, tensor, rank, bit)
    ("parameter", "model.layers.0.self_attn.1.kv_b_proj.weight", 1, 13),
    ("parameter", "model.embed_tokens.weight", 0, 22),
    ("activation", "model.layers.1.self_attn.0.o_proj", 1, 26),
]


def _worker(corpus_cache: str, out_dir: str) -> dict:
    from longcat.distributed import ParallelDims, ProcessGroups
    from longcat.train.sdc import flip_bit_
    from longcat.train.trainer import Trainer

    overrides = {"parallel.cp": 2, "parallel.ep": 2, "determinism.enabled": "true", "sdc.replay_interval": 1,
                 "sdc.replica_interval": 1, "train.steps": 20, "data.seq_length": 16}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, out_dir, **overrides))
    validate_run_config(cfg, world_size=2)
    trainer = Trainer(cfg, groups=ProcessGroups.build(ParallelDims(dist.get_world_size(), cp=2, ep=2)))
    trainer.train_step()
    detected = []
    for i, (target, tensor, rank, bit) in enumerate(CAMPAIGN):
        step = trainer.step + 1
        fault = FaultInjection(step=step, rank=rank, target=target, tensor=tensor, index=50 + 37 * i, bit=bit)
        trainer.sdc.arm(fault)
        trainer.train_step()
        detected.append([(m.check, m.tensor, m.rank) for m in trainer.sdc.mismatches if m.step == step])
        if target == "parameter" and dist.get_rank() == rank:  # repair: the replicas agree again
            flip_bit_(dict(trainer.model.named_parameters())[tensor].data, index=fault.index, bit=bit)
    trainer.train_step()
    return {"detected": detected, "all_steps": sorted({m.step for m in trainer.sdc.mismatches}),
            "checks": dict(trainer.sdc.num_checks)}


def test_faults_are_detected_under_context_parallelism(corpus_cache, tmp_path):
    per_rank = run_distributed(_worker, world_size=2, args=(corpus_cache, str(tmp_path)), timeout_s=300)
    for rank, out in enumerate(per_rank):
        for (target, tensor, fault_rank, _), found in zip(CAMPAIGN, out["detected"]):
            assert found, f"rank {rank}: {target} fault in {tensor} on rank {fault_rank} went undetected"
            if target == "parameter":  # the cp pair's replica check names the pair's higher rank
                assert found == [("replica", tensor, 1)], found
            else:
                assert {check for check, _, _ in found} == {"replay"}, found
                assert fault_rank in {r for _, _, r in found}, found
        assert out["all_steps"] == [2, 3, 4], "a false alarm outside the injected steps"
        assert out["checks"].get("replica", 0) >= 5 and out["checks"].get("replay", 0) >= 5, out["checks"]
    assert per_rank[0]["detected"] == per_rank[1]["detected"]
