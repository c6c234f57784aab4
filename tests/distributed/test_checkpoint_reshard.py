"""Checkpoints reshard: a run saved under one parallel layout resumes under another with the next-step
loss and grad norm of the uninterrupted single-process run (to 1e-5 relative), and, after that step,
its parameters (which also proves the AdamW moments, the step count and the LR came back).

Every source layout trains 3 steps and saves (DCP, global names, global tensors, global expert ids);
every target layout resumes from it (model, AdamW moments, LR schedule step, expert-bias state, data
position) and trains step 4:

    id                            saved under                 resumed under
    ep2->ep1                      ep2 (dp2)                   one process
    ep1->ep2                      one process                 ep2 (dp2)
    tp2->tp1                      tp2                         one process
    pp2->pp1                      pp2 (1F1B)                  one process
    tp2xep2->pp2                  tp2 x ep2 (4 ranks)         pp2
    fsdp-dp4xep2->tp2             FSDP2 dp4 x ep2 (4 ranks)   tp2          experts FSDP-sharded over edp=2
    deepspeed-z2->dp1             DeepSpeed ZeRO-2 dp2        one process  optimizer state from partitions
    dp1->deepspeed-z2             one process                 DeepSpeed ZeRO-2 dp2
    pp2xtp2-sp->tp2               pp2 x tp2 + SP (4 ranks)    tp2
    pp2xtp2-sp->pp1               pp2 x tp2 + SP (4 ranks)    one process
    pp2xfsdp-dp2->pp1             pp2 x FSDP2 dp2 (4 ranks)   one process  stage-rooted FSDP shards
    tp2xep2->pp2xfsdp-dp2         tp2 x ep2 (4 ranks)         pp2 x FSDP2 dp2
    fsdp-dp4xep2->pp2xtp2-sp      FSDP2 dp4 x ep2 (4 ranks)   pp2 x tp2 + SP
    cp2xep2->cp1                  cp2 x ep2 (2 ranks)         one process  experts folded over cp
    cp1->cp2                      one process                 cp2
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.testing.equivalence import (
    SINGLE,
    Layout,
    Task,
    max_relative_difference,
    merged_params,
    run_single,
    run_tasks,
)

RTOL = 1e-5
PARAM_ATOL = 1e-4  # wrong (e.g. zero) AdamW moments would move parameters by ~lr = 3e-3
SAVE_AT = 3

EP2 = Layout("ep2", dp=2, ep=2)
TP2 = Layout("tp2", tp=2)
PP2 = Layout("pp2", pp=2)
TP2XEP2 = Layout("tp2xep2", tp=2, dp=2, ep=2)
FSDP_DP4XEP2 = Layout("fsdp-dp4xep2", dp=4, ep=2, dp_mode="fsdp")
DEEPSPEED = Layout("deepspeed-z2", dp=2, dp_mode="deepspeed", zero_stage=2)
CP2 = Layout("cp2", cp=2)
CP2XEP2 = Layout("cp2xep2", cp=2, ep=2)
PP2XTP2_SP = Layout("pp2xtp2-sp", pp=2, tp=2, sequence_parallel=True)
PP2XFSDP = Layout("pp2xfsdp-dp2", pp=2, dp=2, dp_mode="fsdp")
SOURCES = {"ep1": SINGLE, "ep2": EP2, "tp2": TP2, "pp2": PP2, "tp2xep2": TP2XEP2, "fsdp-dp4xep2": FSDP_DP4XEP2,
           "deepspeed-z2": DEEPSPEED, "pp2xtp2-sp": PP2XTP2_SP, "pp2xfsdp-dp2": PP2XFSDP, "cp2xep2": CP2XEP2}
def reshard_config(corpus_cache: str, out_dir: str):
    """As test_layouts' config with 2 layers: seq 16, 4 micro-batches of 1, MTP, z-loss, fixed LB groups."""
    overrides = {"model.num_layers": 2, "data.seq_length": 16, "data.micro_batch_size": 1,
                 "data.global_batch_size": 4, "moe.lb_num_groups": 2, "model.mtp_num_layers": 1,
                 "loss.z_loss_coef": 1e-4}
    cfg, _ = compose_run_config("pretrain", tiny_overrides(corpus_cache, out_dir, **overrides))
    return cfg


CASES = {  # id: (source, target)
    "ep2->ep1": ("ep2", SINGLE),
    "ep1->ep2": ("ep1", EP2),
    "tp2->tp1": ("tp2", SINGLE),
    "pp2->pp1": ("pp2", SINGLE),
    "tp2xep2->pp2": ("tp2xep2", PP2),
    "fsdp-dp4xep2->tp2": ("fsdp-dp4xep2", TP2),
    "cp2xep2->cp1": ("cp2xep2", SINGLE),
    "cp1->cp2": ("ep1", CP2),
    "pp2xtp2-sp->tp2": ("pp2xtp2-sp", TP2),
    "pp2xtp2-sp->pp1": ("pp2xtp2-sp", SINGLE),
    "pp2xfsdp-dp2->pp1": ("pp2xfsdp-dp2", SINGLE),
    "tp2xep2->pp2xfsdp-dp2": ("tp2xep2", PP2XFSDP),
    "fsdp-dp4xep2->pp2xtp2-sp": ("fsdp-dp4xep2", PP2XTP2_SP),
    # DeepSpeed last in each world size: its engine sets process-wide state of its own.
    "deepspeed-z2->dp1": ("deepspeed-z2", SINGLE),
    "dp1->deepspeed-z2": ("ep1", DEEPSPEED),
}


@pytest.fixture(scope="module")
def resumed(corpus_cache, tmp_path_factory):
    """Per case id the target's LayoutRuns for step 4; the sources' runs; the uninterrupted reference."""
    root = tmp_path_factory.mktemp("reshard")
    cfg = reshard_config(corpus_cache, str(root / "unused"))
    reference = run_single(cfg, num_steps=SAVE_AT + 1)
    saved = {name: root / "src" / name for name in SOURCES}

    def checkpoint(name: str) -> str:
        return str(saved[name] / "checkpoints" / f"step_{SAVE_AT:08d}")

    def save(name: str) -> Task:
        return Task(SOURCES[name], SAVE_AT, out_dir=str(saved[name]), save=True)

    def resume(case_id: str) -> Task:
        source, target = CASES[case_id]
        return Task(target, 1, out_dir=str(root / "dst" / case_id.replace(">", "")), resume_from=checkpoint(source))

    # Grouped by world size: one start-up of the processes per group.
    sources = {}
    for tasks in ([save("ep1")], [save("tp2xep2"), save("fsdp-dp4xep2"), save("pp2xtp2-sp"), save("pp2xfsdp-dp2")],
                  [save("ep2"), save("tp2"), save("pp2"), save("cp2xep2"), save("deepspeed-z2")]):
        for task, ranks in zip(tasks, run_tasks(cfg, tasks, timeout_s=300)):
            sources[task.layout.name] = ranks[0]
    out = {}
    for size in (4, 2, 1):
        ids = [i for i, (_, target) in CASES.items() if target.world_size == size]
        for case_id, ranks in zip(ids, run_tasks(cfg, [resume(i) for i in ids], timeout_s=300)):
            out[case_id] = ranks
    return {"reference": reference, "sources": sources, "resumed": out, "checkpoint": checkpoint}


@pytest.mark.parametrize("case_id", list(CASES))
def test_resume_under_another_layout(case_id, resumed):
    reference = resumed["reference"]
    source = resumed["sources"][SOURCES[CASES[case_id][0]].name]
    ranks = resumed["resumed"][case_id]
    assert max_relative_difference(source.losses, reference.losses[:SAVE_AT]) <= RTOL
    diff = max_relative_difference(ranks[0].losses, reference.losses[SAVE_AT:])
    print(f"{case_id}: next-step loss relative difference {diff:.2e}")
    assert diff <= RTOL, (ranks[0].losses, reference.losses[SAVE_AT:])
    assert max_relative_difference(ranks[0].grad_norms, reference.grad_norms[SAVE_AT:]) <= RTOL
    for run in ranks:  # the controller state and counts carried over exactly
        for layer, bias in run.biases[0].items():
            assert torch.equal(bias, reference.biases[SAVE_AT][layer]), (run.rank, layer)
    params = merged_params(ranks)
    assert params.keys() == reference.params.keys()
    for name, expected in reference.params.items():
        torch.testing.assert_close(params[name], expected, rtol=0, atol=PARAM_ATOL, msg=name)


def test_checkpoint_names_are_global(resumed):
    """The ep2 checkpoint holds the full [N, I, D] expert tensors (and moments) under the single-process
    names: global expert ids, whatever the layout that wrote it."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(resumed["checkpoint"]("ep2")).read_metadata().state_dict_metadata
    name = "model.layers.0.mlp.experts.gate_proj"
    assert tuple(meta[f"model.{name}"].size) == (4, 16, 32)  # N=4 experts, I=16, D=32: global, not N/ep
    assert tuple(meta[f"optim.state.{name}.exp_avg"].size) == (4, 16, 32)
