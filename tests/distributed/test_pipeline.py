"""Pipeline parallelism against the single-process trainer objective, forward and backward.

Every rank builds the full tiny model from one seed, runs the non-pipelined trainer's objective
(``_reference``: the terms of ``Trainer.forward_backward``, micro-batch by micro-batch) on a copy as
the reference, and checks its own stages: the loss terms, every local parameter's gradient, the MoE
counts for the expert-bias controller, the grad norm, the eval loss and DCP checkpoints moving
between the pp=2 and the unsplit layout. Rank bodies are module-level functions so that spawn can
pickle them.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from longcat.config.schema import LossConfig, ModelConfig, MoEConfig
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.distributed.pipeline import StagePassOutput, plan_stages
from longcat.model import LongcatFlashForCausalLM
from longcat.model.parallel.pipeline import build_pipeline
from longcat.testing import run_distributed
from longcat.train import losses
from longcat.train.objective import TrainingObjective

TIMEOUT_S = 90
NUM_MICROBATCHES = 4
CFG = ModelConfig(
    vocab_size=64, hidden_size=16, num_layers=4, num_attention_heads=2, ffn_hidden_size=32, q_lora_rank=8,
    kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4, zero_expert_num=2,
    moe_topk=2, expert_ffn_hidden_size=8, initializer_range=0.2, mtp_num_layers=1,
)
MOE = MoEConfig(expected_ffn_experts=1.5, lb_loss_coef=0.1)
LOSS = LossConfig(mtp_weight=0.3, z_loss_coef=1e-3)
REL = 1e-5


def _micro_batches(num: int, *, seed: int) -> list[dict]:
    """[2, 8] micro-batches with unlabelled positions and right padding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(num):
        input_ids = torch.randint(0, CFG.vocab_size, (2, 8), generator=gen)
        labels = torch.roll(input_ids, -1, dims=1)
        labels[:, -1] = losses.IGNORE_INDEX
        labels[0, m % 3] = losses.IGNORE_INDEX
        token_mask = torch.ones(2, 8, dtype=torch.bool)
        token_mask[1, 8 - 1 - m % 3:] = False
        labels[~token_mask] = losses.IGNORE_INDEX
        out.append(dict(input_ids=input_ids, labels=labels, token_mask=token_mask))
    return out


def _global_counts(micro_batches) -> losses.GlobalTokenCounts:
    """As ``Trainer._global_counts`` for the whole global batch."""
    num_labels = sum(int((mb["labels"] != losses.IGNORE_INDEX).sum()) for mb in micro_batches)
    num_mtp = sum(int((losses.mtp_labels(mb["labels"]) != losses.IGNORE_INDEX).sum()) for mb in micro_batches)
    num_real = sum(int(mb["token_mask"].sum()) for mb in micro_batches)
    return losses.GlobalTokenCounts(*(max(float(c), 1.0) for c in (num_labels, num_mtp, num_real)))


@dataclasses.dataclass
class Parts:
    ce: float = 0.0
    mtp: float = 0.0
    z: float = 0.0
    lb: float = 0.0


def _reference(ref, micro_batches, *, accum: int, dp_size: int, counts=None):
    """The non-PP trainer (``Trainer.forward_backward``'s terms) on the full model, every micro-batch of
    the global batch backpropagated in turn: (counts, Parts, per micro-batch MoEStats). ``counts``: the
    global batch's token counts (default: those of ``micro_batches``)."""
    counts = counts or _global_counts(micro_batches)
    parts, stats = Parts(), []
    for mb in micro_batches:
        out = ref(mb["input_ids"], token_mask_BS=mb["token_mask"])
        labels_BS = mb["labels"]
        ce = losses.cross_entropy_sum(out.logits_BSV, labels_BS) / counts.num_labels
        mtp = LOSS.mtp_weight * losses.cross_entropy_sum(
            out.mtp_logits_BSV, losses.mtp_labels(labels_BS)) / counts.num_mtp_labels
        z = LOSS.z_loss_coef * losses.hidden_z_loss_sum(out.last_hidden_BSD, mb["token_mask"]) / counts.num_real
        lb = sum(
            losses.load_balance_loss(s.expert_counts_E, s.prob_sum_E, s.num_tokens,
                                     n_routed_experts=CFG.n_routed_experts, moe_topk=CFG.moe_topk,
                                     expected_ffn_experts=MOE.expected_ffn_experts, num_groups=1)
            for s in out.moe_stats
        ) * (MOE.lb_loss_coef / (accum * dp_size))
        (ce + mtp + z + lb).backward()
        for name, term in zip(("ce", "mtp", "z", "lb"), (ce, mtp, z, lb)):
            setattr(parts, name, getattr(parts, name) + term.item())
        stats.append(out.moe_stats)
    return counts, parts, stats


def _objective(cfg: ModelConfig = CFG, *, dp_size: int = 1) -> TrainingObjective:
    """The trainer's objective for ``build_pipeline`` (no ep: one LB group, as ``_reference``)."""
    return TrainingObjective(loss_cfg=LOSS, moe_cfg=MOE, model_cfg=cfg, num_microbatches=NUM_MICROBATCHES,
                             dp_size=dp_size, ep_size=1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _assert_losses(got, parts: Parts) -> None:
    for name in ("ce", "mtp", "z", "lb"):
        want = getattr(parts, name)
        assert want > 0, name  # every term is switched on and non-trivial
        assert abs(getattr(got, name) - want) <= REL * abs(want), (name, getattr(got, name), want)


def _assert_grads(local_model, ref) -> None:
    ref_params = dict(ref.named_parameters())
    for name, param in local_model.named_parameters():
        want = ref_params[name].grad
        assert want is not None and param.grad is not None, name
        assert _rel_err(param.grad, want) <= REL, (name, _rel_err(param.grad, want))


def _assert_moe_counts(out, ref_stats) -> None:
    assert len(out.per_microbatch) == len(ref_stats)
    for got_m, ref_m in zip(out.per_microbatch, ref_stats):
        assert len(got_m) == len(out.local_layer_ids)
        for got, layer in zip(got_m, out.local_layer_ids):
            want = ref_m[layer]
            assert torch.equal(got.expert_counts_E, want.expert_counts_E)
            assert torch.equal(got.num_tokens, want.num_tokens)
            assert torch.equal(got.ffn_per_token_T, want.ffn_per_token_T)


def _build(cfg: ModelConfig, *, checkpointing: bool):
    torch.manual_seed(0)
    model = LongcatFlashForCausalLM(cfg, activation_checkpointing=checkpointing)
    ref = LongcatFlashForCausalLM(cfg)
    ref.load_state_dict(model.state_dict())
    return model, ref


# ----------------------------------------------------------------------------------- pp=2


def _parity_body(schedule: str, tie: bool, checkpointing: bool, ckpt_dir: str | None):
    groups = ProcessGroups.build(ParallelDims(2, pp=2))
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tie)
    model, ref = _build(cfg, checkpointing=checkpointing)
    runner = build_pipeline(model, groups=groups, schedule=schedule, num_microbatches=NUM_MICROBATCHES,
                            objective=_objective(cfg))

    # Global names: every local name is the full model's, and the ranks together hold all of them.
    full_names = {name for name, _ in ref.named_parameters()}
    local_names = [name for name, _ in runner.local_model.named_parameters()]
    assert set(local_names) <= full_names
    gathered = [None, None]
    dist.all_gather_object(gathered, local_names, group=groups.pp_group)
    assert set(gathered[0]) | set(gathered[1]) == full_names
    layer_ids = {int(n.split(".")[2]) for n in local_names if n.startswith("model.layers.")}
    assert layer_ids == set(runner.local_layer_ids)

    for seed in (1, 2):  # a second step reuses the built schedule
        runner.local_model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        micro_batches = _micro_batches(NUM_MICROBATCHES, seed=seed)
        counts, parts, ref_stats = _reference(ref, micro_batches, accum=NUM_MICROBATCHES, dp_size=1)
        out = runner.step(micro_batches, counts)
        runner.sync_tied_embedding_grads()
        _assert_losses(Parts(*out.loss_sums), parts)
        _assert_grads(runner.local_model, ref)
        _assert_moe_counts(out, ref_stats)

    norm = runner.clip_grad_norm_(0.5)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
    assert abs(norm - ref_norm) <= REL * ref_norm and ref_norm > 0.5
    _assert_grads(runner.local_model, ref)

    eval_batches = _micro_batches(3, seed=5)  # a count unrelated to num_microbatches
    ce_sum, num_labels = runner.eval_loss(eval_batches)
    with torch.no_grad():
        want = sum(losses.cross_entropy_sum(ref(mb["input_ids"], token_mask_BS=mb["token_mask"]).logits_BSV,
                                            mb["labels"]).item() for mb in eval_batches)
    assert num_labels == sum(int((mb["labels"] != losses.IGNORE_INDEX).sum()) for mb in eval_batches)
    assert abs(ce_sum - want) <= REL * want

    _isolated_matches_reference(runner, ref, _micro_batches(NUM_MICROBATCHES, seed=4))
    if ckpt_dir is not None:
        _checkpoint_round_trip(runner, ref, cfg, ckpt_dir)
    return out.loss_sums


def _isolated_matches_reference(runner, ref, micro_batches) -> None:
    """``run_isolated``: one micro-batch on its own through the stages (the training forward, parameter
    gradients accumulated) gives the reference's loss terms and gradients of that micro-batch alone;
    the stages' records of the schedule are untouched and nothing travels back on the first stage."""
    counts = _global_counts(micro_batches)
    runner.local_model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    _, parts, _ = _reference(ref, micro_batches[:1], accum=NUM_MICROBATCHES, dp_size=1, counts=counts)
    results = runner.run_isolated(micro_batches[0], counts, param_grads=True,
                                  stage_fn=lambda stage, x, kw: StagePassOutput(output=stage(x, **kw)))
    assert [r.stage_index for r in results] == list(runner.plan.local_stages(runner.pp_rank))
    sums = torch.stack([r.record.loss_sums for r in results]).sum(0)
    dist.all_reduce(sums, group=runner.pp_group)
    _assert_losses(Parts(*sums.tolist()), parts)
    runner.sync_tied_embedding_grads()
    _assert_grads(runner.local_model, ref)
    for r in results:
        assert (r.input_grad is None) == (r.stage_index == 0)
        assert all(s.record.loss_sums is None for s in runner.stages)  # the schedule's records untouched
    runner.local_model.zero_grad(set_to_none=True)


def _checkpoint_round_trip(runner, ref, cfg: ModelConfig, ckpt_dir: str) -> None:
    """pp=2 -> unsplit and unsplit -> pp=2 through torch.distributed.checkpoint."""
    dcp.save(runner.local_model.state_dict(), checkpoint_id=f"{ckpt_dir}/pp2")
    torch.manual_seed(123)
    whole = LongcatFlashForCausalLM(cfg)
    state = whole.state_dict()
    dcp.load(state, checkpoint_id=f"{ckpt_dir}/pp2", no_dist=True)
    for name, tensor in ref.state_dict().items():  # weights never stepped: the pipeline's are ref's
        assert torch.equal(state[name], tensor), name

    torch.manual_seed(7)
    other = LongcatFlashForCausalLM(cfg)
    if dist.get_rank() == 0:
        dcp.save(other.state_dict(), checkpoint_id=f"{ckpt_dir}/pp1", no_dist=True)
    dist.barrier()
    local_state = runner.local_model.state_dict()
    dcp.load(local_state, checkpoint_id=f"{ckpt_dir}/pp1")
    runner.local_model.load_state_dict(local_state)
    other_state = other.state_dict()
    for name, tensor in runner.local_model.state_dict().items():
        assert torch.equal(tensor, other_state[name]), name


@pytest.mark.parametrize(
    "schedule, tie, checkpointing",
    # zbv with a tied head: the last stage's table also embeds the MTP input (StageModule.split_backward)
    [("1f1b", False, False), ("interleaved_1f1b", True, False), ("zbv", False, True), ("zbv", True, False)],
)
def test_pipeline_matches_single_process(schedule, tie, checkpointing, tmp_path):
    ckpt_dir = str(tmp_path) if schedule == "1f1b" else None
    results = run_distributed(_parity_body, world_size=2, args=(schedule, tie, checkpointing, ckpt_dir),
                              timeout_s=TIMEOUT_S)
    assert results[0] == results[1]  # every rank reports the same loss terms


# ----------------------------------------------------------------------------------- pp=2 x dp=2


def _pp_dp_body():
    groups = ProcessGroups.build(ParallelDims(4, pp=2))
    model, ref = _build(CFG, checkpointing=False)
    runner = build_pipeline(model, groups=groups, schedule="interleaved_1f1b", num_microbatches=NUM_MICROBATCHES,
                            objective=_objective(dp_size=2))
    everything = _micro_batches(2 * NUM_MICROBATCHES, seed=3)
    mine = everything[groups.dp_rank * NUM_MICROBATCHES:(groups.dp_rank + 1) * NUM_MICROBATCHES]
    counts, parts, ref_stats = _reference(ref, everything, accum=NUM_MICROBATCHES, dp_size=2)
    out = runner.step(mine, counts)
    runner.sync_tied_embedding_grads()
    for param in runner.local_model.parameters():
        dist.all_reduce(param.grad, group=groups.dp_group)  # the trainer's DP grad sync
    _assert_grads(runner.local_model, ref)
    _assert_moe_counts(out, ref_stats[groups.dp_rank * NUM_MICROBATCHES:(groups.dp_rank + 1) * NUM_MICROBATCHES])
    totals = torch.tensor(out.loss_sums, dtype=torch.float64)
    dist.all_reduce(totals, group=groups.dp_group)
    _assert_losses(Parts(*totals.tolist()), parts)


def test_pipeline_with_data_parallel_matches_single_process():
    run_distributed(_pp_dp_body, world_size=4, timeout_s=TIMEOUT_S)


def _pp_fsdp_isolated_body(schedule: str):
    from torch.distributed.tensor import DTensor

    from longcat.config.schema import ParallelConfig
    from longcat.model.parallel.parallelize import parallelize

    groups = ProcessGroups.build(ParallelDims(4, pp=2))
    model, ref = _build(CFG, checkpointing=False)
    runner = parallelize(model, groups=groups, options=ParallelConfig(pp=2, dp=2, dp_mode="fsdp", pp_schedule=schedule),
                         num_microbatches=NUM_MICROBATCHES, objective=_objective(dp_size=2)).pipeline
    assert runner is not None
    sharded = {name for name, p in runner.local_model.named_parameters() if isinstance(p, DTensor)}
    assert sharded  # FSDP2 stage roots

    everything = _micro_batches(2 * NUM_MICROBATCHES, seed=3)
    firsts = everything[::NUM_MICROBATCHES]  # each dp rank's first micro-batch
    counts = _global_counts(everything)
    # forward only: the stages' gathered weights are freed again (reshard_after_forward=False under PP)
    with torch.no_grad():
        runner.run_isolated(firsts[groups.dp_rank], counts, backward=False,
                            stage_fn=lambda stage, x, kw: StagePassOutput(output=stage(x, **kw)))
    assert sharded == {name for name, p in runner.local_model.named_parameters() if isinstance(p, DTensor)}

    ref.zero_grad(set_to_none=True)
    _, parts, _ = _reference(ref, firsts, accum=NUM_MICROBATCHES, dp_size=2, counts=counts)
    results = runner.run_isolated(firsts[groups.dp_rank], counts, param_grads=True,
                                  stage_fn=lambda stage, x, kw: StagePassOutput(output=stage(x, **kw)))
    sums = torch.stack([r.record.loss_sums for r in results]).sum(0)
    dist.all_reduce(sums)  # [4] -> all_reduce(sum, pp x dp) -> [4]: both stages, both dp ranks' micro-batch
    _assert_losses(Parts(*sums.tolist()), parts)
    runner.sync_tied_embedding_grads()
    assert sharded == {name for name, p in runner.local_model.named_parameters() if isinstance(p, DTensor)}
    ref_params = dict(ref.named_parameters())
    for name, param in runner.local_model.named_parameters():  # the same order on both dp ranks of a stage
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad  # gathered over dp
        if name not in sharded:  # left whole (ZB-V's shared embedding): summed over dp as the trainer does
            dist.all_reduce(grad, group=groups.dp_group)
        assert _rel_err(grad, ref_params[name].grad) <= REL, (name, _rel_err(grad, ref_params[name].grad))


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_isolated_pass_through_fsdp_stage_roots_matches_single_process(schedule):
    """``run_isolated`` when every stage module is an FSDP2 root (pp 2 x dp 2): the stages' hooks
    gather the weights, the pass's parameter gradients are reduce-scattered over dp into the sharded
    ``.grad`` and equal one process's gradients of the two dp ranks' micro-batches; the weights are
    resharded after the pass, also after a forward-only one."""
    run_distributed(_pp_fsdp_isolated_body, world_size=4, args=(schedule,), timeout_s=TIMEOUT_S)


# ----------------------------------------------------------------------------------- plan


def test_stage_plan_placement():
    loop = plan_stages(num_layers=4, pp_size=2, schedule="interleaved_1f1b")
    assert loop.stage_to_pp_rank == (0, 1, 0, 1) and loop.local_layers(0) == (0, 2)
    v = plan_stages(num_layers=8, pp_size=2, schedule="zbv")
    assert v.stage_to_pp_rank == (0, 1, 1, 0) and v.local_layers(0) == (0, 1, 6, 7)
    single = plan_stages(num_layers=4, pp_size=2, schedule="1f1b")
    assert single.layer_ranges == (range(0, 2), range(2, 4))


def test_layers_not_divisible_by_stages():
    groups = types.SimpleNamespace(pp_size=2)  # fails before any process group is touched
    model = LongcatFlashForCausalLM(dataclasses.replace(CFG, num_layers=6))
    with pytest.raises(ValueError, match=r"num_layers=6 .* 4 pipeline stages .*pp=2 x 2"):
        build_pipeline(model, groups=groups, schedule="interleaved_1f1b", num_microbatches=4,
                       objective=_objective())
    with pytest.raises(ValueError, match="num_layers=3 .* 2 pipeline stages"):
        plan_stages(num_layers=3, pp_size=2, schedule="1f1b")
    with pytest.raises(ValueError, match="unknown pipeline schedule 'gpipe'"):
        plan_stages(num_layers=4, pp_size=2, schedule="gpipe")
