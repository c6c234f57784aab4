"""One micro-batch through every pipeline stage on its own, outside the schedule.

A pipeline schedule interleaves micro-batches over the stages and accumulates their gradients, so
nothing in it belongs to one micro-batch alone. Two checks need exactly that:

- the router gradient-norm ratio R_g (arXiv 2509.01322 §3.1.3, Eq. 9) wants the gradient of the
  objective's LM part alone (without the load-balance terms) at every stage's routers;
- the SDC replay (§5.1) recomputes one micro-batch's forward and backward and compares the bits
  stage by stage.

``run_isolated`` runs one micro-batch as a chain: forward through the stages in stage order, then
backward in reverse stage order, the activation [B, S/sp, D] and its gradient sent point to point
between consecutive stages' ranks (blocking: one stage computes at a time, so any placement, loop or
V, pairs its transfers). Each stage's input is a fresh leaf, so every stage's backward is its own
and its input gradient is returned. What a stage computes in the pass is the caller's
``stage_fn``; each stage runs it with a fresh ``StageRecord`` (its training record is put back
afterwards, untouched), and ``step_input`` set as in ``PipelineRunner.step``.

``stage_fn`` must go through the stage module's call (``stage(x, ...)``), never one of its
methods: under FSDP2 each stage module is an FSDP root, whose hooks gather its parameters before
the forward and, in the backward, reduce-scatter the gradients over dp into the sharded ``.grad``
and reshard. For the pass every FSDP root of the stages is set to that plain single-backward
behaviour (gradient sync, reshard after backward, last backward: what the schedule's last
micro-batch leaves anyway), so the pass leaves no unreduced gradient behind for the next step, and
every FSDP unit is resharded afterwards. A pass with ``param_grads=False`` computes no parameter
gradient: nothing is reduced and ``.grad`` is untouched; with ``param_grads=True`` the reduced
gradients land in ``.grad`` (the SDC replay stashes the step's around the pass). Every dp rank of a
stage must run the pass at the same point (the all-gathers and reduce-scatters pair over dp).

Cost: one micro-batch's forward (and backward) on every stage, with no overlap between stages.

Shape legend:
    B  micro-batch size
    S  sequence (S/tp between stages under sequence parallelism)
    D  hidden size
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from longcat.distributed.pipeline_stage import StageModule, StageRecord

if TYPE_CHECKING:
    from longcat.distributed.pipeline import PipelineRunner

__all__ = ["StagePassOutput", "StagePassResult", "run_isolated"]


@dataclass
class StagePassOutput:
    """What a ``stage_fn`` returns for one stage.

    output: [B, S/sp, D] activation (non-last stage) or the [] scalar the backward starts from (last
        stage), part of the graph of the stage's input and parameters.
    watched: tensors of the stage's graph whose gradients the caller wants (e.g. router probabilities).
    report: anything the caller wants back (e.g. MoE statistics).
    """

    output: torch.Tensor
    watched: Sequence[torch.Tensor] = ()
    report: Any = None


@dataclass
class StagePassResult:
    """One local stage's part of ``run_isolated``.

    output: the stage's output, detached.
    input_grad: gradient of the stage's input activation [B, S/sp, D] (None on the first stage,
        whose input is token ids, and without backward).
    watched_grads: per ``StagePassOutput.watched`` its gradient (None where the output does not
        depend on it).
    record: what the stage's forward recorded (``StageRecord``; loss terms, report per forward).
    report: the ``stage_fn``'s report.
    """

    stage_index: int
    output: torch.Tensor
    input_grad: Optional[torch.Tensor]
    watched_grads: list[Optional[torch.Tensor]]
    record: StageRecord
    report: Any = None
    _graph: Any = field(default=None, repr=False)


StageFn = Callable[[Any, torch.Tensor, dict[str, torch.Tensor]], StagePassOutput]


def run_isolated(runner: PipelineRunner, inputs: dict[str, torch.Tensor], step_input: Any, *, stage_fn: StageFn,
                 backward: bool = True, param_grads: bool = False) -> list[StagePassResult]:
    """Forward (and backward) of one micro-batch through every stage; this rank's stages' results.

    Collective over the pipeline group: every rank calls it with the same micro-batch.

    Args:
        runner: the pipeline (its plan, groups, stages, activation shape).
        inputs: the micro-batch's [B, S] tensors (``input_ids``, ``labels``, ``token_mask``[,
            ``position_ids``]) on the stages' device.
        step_input: set as every stage's ``step_input`` for the pass (the global token counts).
        stage_fn: ``stage_fn(stage, x, inputs) -> StagePassOutput``: the stage's forward on input x
            (token ids on the first stage, else a leaf activation requiring grad), through the
            module call ``stage(x, ...)`` (FSDP2's hooks; see the module docstring).
        backward: run the backward chain (else forward only, under the caller's grad mode).
        param_grads: the backward accumulates into the parameters' ``.grad`` (the caller stashes
            them around the pass); else only the inputs' and ``watched`` gradients are computed.

    Returns:
        Per local stage, ascending stage index, a ``StagePassResult``.

    Raises:
        RuntimeError: ``stage_fn`` did not call the stage module.
    """
    for stage in runner.stages:
        if isinstance(stage, FSDPModule):  # one plain backward: reduce-scatter now, reshard after it
            stage.set_is_last_backward(True)
            stage.set_requires_gradient_sync(True)
            stage.set_reshard_after_backward(True)
    try:
        return _run_chain(runner, inputs, step_input, stage_fn=stage_fn, backward=backward, param_grads=param_grads)
    finally:
        for stage in runner.stages:  # free what a forward gathered (reshard_after_forward=False under PP)
            for module in stage.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def _run_chain(runner: PipelineRunner, inputs: dict[str, torch.Tensor], step_input: Any, *, stage_fn: StageFn,
               backward: bool, param_grads: bool) -> list[StagePassResult]:
    plan, pp_rank, group = runner.plan, runner.pp_rank, runner.pp_group
    ranks = plan.stage_to_pp_rank
    local: dict[int, StageModule] = {s.stage_index: s for s in runner.stages}
    B, S = inputs["input_ids"].shape
    act_shape = (B, S // runner.seq_divisor, runner.hidden_size)
    device = runner.device

    results: dict[int, StagePassResult] = {}
    handoff: Optional[torch.Tensor] = None  # the previous stage's output when it ran on this rank
    for s in range(plan.num_stages):
        if s not in local:
            continue
        stage = local[s]
        if stage.is_first:
            x = inputs["input_ids"]
        else:
            if ranks[s - 1] == pp_rank:
                assert handoff is not None
                x = handoff.detach()
            else:
                x = torch.empty(act_shape, dtype=runner.activation_dtype, device=device)
                # [B, S/sp, D] <- recv(pp, from stage s-1's rank)
                dist.recv(x, group=group, group_src=ranks[s - 1])
            x.requires_grad_(backward and torch.is_grad_enabled())
        out, record = _forward_stage(stage, x, inputs, step_input, stage_fn=stage_fn)
        results[s] = StagePassResult(stage_index=s, output=out.output.detach(), input_grad=None,
                                     watched_grads=[None] * len(out.watched), record=record, report=out.report,
                                     _graph=(x, out))
        if not stage.is_last:
            if ranks[s + 1] == pp_rank:
                handoff = out.output
            else:
                # [B, S/sp, D] -> send(pp, to stage s+1's rank)
                dist.send(out.output.detach().contiguous(), group=group, group_dst=ranks[s + 1])

    if backward:
        for s in reversed(range(plan.num_stages)):
            if s not in local:
                continue
            _backward_stage(results, local[s], ranks=ranks, pp_rank=pp_rank, group=group, act_shape=act_shape,
                            dtype=runner.activation_dtype, device=device, param_grads=param_grads)
    for r in results.values():
        r._graph = None
    return [results[s] for s in sorted(results)]


def _forward_stage(stage: StageModule, x: torch.Tensor, inputs: dict[str, torch.Tensor], step_input: Any, *,
                   stage_fn: StageFn) -> tuple[StagePassOutput, StageRecord]:
    """``stage_fn`` on one stage with a fresh record and ``step_input`` (both put back afterwards):
    (its output, what the stage recorded)."""
    saved_record, saved_input = stage.record, stage.step_input
    stage.record, stage.step_input = StageRecord(), step_input
    calls: list[bool] = []
    hook = stage.register_forward_pre_hook(lambda *_: calls.append(True))
    try:
        out = stage_fn(stage, x, inputs)
    finally:
        hook.remove()
        record = stage.record
        stage.record, stage.step_input = saved_record, saved_input
    if not calls:
        raise RuntimeError(f"run_isolated: the stage_fn did not call stage {stage.stage_index}'s module; call it as "
                           "stage(x, ...) so that the hooks around it (FSDP2's gather) run")
    return out, record


def _backward_stage(results: dict[int, StagePassResult], stage: StageModule, *, ranks: Sequence[int], pp_rank: int,
                    group: Optional[dist.ProcessGroup], act_shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device, param_grads: bool) -> None:
    s = stage.stage_index
    result = results[s]
    x, out = result._graph
    if stage.is_last:
        grad_out = None
    elif ranks[s + 1] == pp_rank:
        grad_out = results[s + 1].input_grad
        assert grad_out is not None
    else:
        grad_out = torch.empty(act_shape, dtype=dtype, device=device)
        # [B, S/sp, D] <- recv(pp, from stage s+1's rank): the gradient of this stage's output
        dist.recv(grad_out, group=group, group_src=ranks[s + 1])
    takes_grad = x.requires_grad
    watched = list(out.watched)
    if param_grads:
        for t in watched:
            t.retain_grad()
        torch.autograd.backward(out.output, grad_tensors=grad_out)
        result.input_grad = x.grad if takes_grad else None
        result.watched_grads = [t.grad for t in watched]
    else:
        wanted = watched + ([x] if takes_grad else [])
        if wanted:
            grads = torch.autograd.grad(out.output, wanted, grad_outputs=grad_out, allow_unused=True)
            result.watched_grads = list(grads[:len(watched)])
            result.input_grad = grads[-1] if takes_grad else None
    if not stage.is_first and ranks[s - 1] != pp_rank:
        assert result.input_grad is not None
        # [B, S/sp, D] -> send(pp, to stage s-1's rank): the gradient of its output
        dist.send(result.input_grad.contiguous(), group=group, group_dst=ranks[s - 1])
