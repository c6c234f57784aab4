"""A model-agnostic pipeline runner on ``torch.distributed.pipelining`` schedules.

``PipelineRunner`` runs one global batch's micro-batches (those of this DP rank) through this rank's
stages (``StageModule``s, built by the model's plan: LongCat-Flash's is
``longcat.model.parallel.pipeline.build_pipeline``) under one schedule:

    1f1b              Schedule1F1B                one stage per rank
    interleaved_1f1b  ScheduleInterleaved1F1B     2 virtual stages per rank (loop placement)
    zbv               ScheduleZBVZeroBubble       2 stages per rank in a V, backward split into
                                                  input- and weight-gradient passes (V-ZB, as the paper)

The last stage's forward returns the micro-batch's objective, which the schedule's loss function
passes through and backpropagates; gradients are not rescaled (``scale_grads=False``): the objective
is already normalised. A parameter that the first and the last stage both hold (a tied embedding
table) is kept equal by summing its gradient over the two (Megatron's embedding group).

What the trainer does each step:

    out = runner.step(micro_batches, step_input)      # forward + backward of all micro-batches
    (out.loss_sums, out.per_microbatch: the stages' records, summed / gathered over pp)
    runner.sync_tied_embedding_grads()                # embedding group: first + last stage
    all-reduce every runner.local_model grad over dp  # (edp for experts)
    grad norm over runner.grad_norm_parameters()      # the tied copy counted once
    optimizer.step()

Under FSDP2 each stage module is its own ``fully_shard`` root (``PipelineStage`` sees an
``FSDPModule``): the schedule then holds back the gradient reduce-scatter until a stage's last
micro-batch backward and runs it once (no DP all-reduce for those parameters). ``eval_loss`` calls
each stage module (``forward(..., evaluate=True)``) so its FSDP hooks gather the weights, and
reshards every FSDP unit of the stages afterwards.

``runner.run_isolated(micro_batch, step_input, stage_fn=...)`` runs one micro-batch through every
stage on its own, outside the schedule (R_g's LM-only gradient, the SDC replay); it calls each stage
module too, so under FSDP2 the roots' hooks gather, reduce-scatter and reshard as for one plain
backward (``longcat.distributed.pipeline_chain``).

Shape legend:
    B  micro-batch size
    S  sequence (S/tp between stages under sequence parallelism)
    D  hidden size
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from longcat.distributed.groups import ProcessGroups, rank_layout
from longcat.distributed.pipeline_chain import StageFn, StagePassOutput, StagePassResult, run_isolated
from longcat.distributed.pipeline_stage import (
    PipelineSchedule,
    StageModule,
    StagePlan,
    plan_stages,
)

__all__ = [
    "PipelineRunner",
    "PipelineSchedule",
    "PipelineStepOutput",
    "StagePassOutput",
    "StagePassResult",
    "StagePlan",
    "plan_stages",
]

logger = logging.getLogger(__name__)

_SCHEDULES = {
    PipelineSchedule.one_f_one_b: Schedule1F1B,
    PipelineSchedule.interleaved_1f1b: ScheduleInterleaved1F1B,
    PipelineSchedule.zbv: ScheduleZBVZeroBubble,
}
_MICRO_BATCH_KEYS = ("input_ids", "labels", "token_mask")
_OPTIONAL_KEYS = ("position_ids", "mtp_labels", "mtp_input_ids")  # [B, S] each, passed on when present


@dataclass
class PipelineStepOutput:
    """One ``PipelineRunner.step``.

    loss_sums: the stages' loss terms (``StageRecord.loss_sums``, the objective's order) summed over
        the micro-batches of this DP rank and over the pipeline stages; identical on every rank of
        the pipeline group (sum over dp for the global value).
    per_microbatch: ``[micro-batch][...]`` what this rank's stages reported, in stage order (one
        entry per real forward: an activation recompute never adds one).
    local_layer_ids: global indices of this rank's layers, ascending.
    kept_outputs: per local stage index, the forward output of micro-batch ``keep_output_of``
        (``step``'s argument; empty without it): [B, S/sp, D] activation or the last stage's [] objective.
    """

    loss_sums: tuple[float, ...]
    per_microbatch: list[list[Any]]
    local_layer_ids: tuple[int, ...]
    kept_outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class PipelineRunner:
    """Runs this rank's pipeline stages under one schedule.

    Args:
        stages: this rank's stage modules, ascending stage index (``plan.local_stages(pp_rank)``).
        plan: the stage plan (layers per stage, stage -> pipeline rank).
        groups: the job's process groups (pipeline = ``pp_group``).
        num_microbatches: micro-batches per step of this DP rank.
        local_model: one ``nn.Module`` holding every parameter of this rank under the full model's
            names: give it to the optimizer, the DP grad sync and ``torch.distributed.checkpoint``.
        hidden_size, activation_dtype: the activation between stages is [B, S/seq_divisor, hidden_size]
            of this dtype.
        seq_divisor: tp under sequence parallelism (stages exchange [B, S/tp, D]), else 1.
        tied_parameter: the name in ``local_model`` of a parameter the first and the last stage both
            hold (a tied embedding table), or None.

    Collective (when pp > 2 and ``tied_parameter`` is set: ``new_group`` for every pipeline).

    Raises:
        ValueError: a micro-batch count the schedule cannot run (e.g. 1F1B needs >= pp micro-batches).
    """

    def __init__(self, stages: Sequence[StageModule], *, plan: StagePlan, groups: ProcessGroups, num_microbatches: int,
                 local_model: nn.Module, hidden_size: int, activation_dtype: torch.dtype, seq_divisor: int = 1,
                 tied_parameter: Optional[str] = None):
        self.plan = plan
        self.groups = groups
        self.pp_group = groups.pp_group
        self.pp_rank = groups.pp_rank
        self.num_microbatches = num_microbatches
        assert [s.stage_index for s in stages] == list(plan.local_stages(self.pp_rank)), "this rank's stages"
        self.stages = list(stages)
        self.local_layer_ids = plan.local_layers(self.pp_rank)
        self.local_model = local_model
        self.hidden_size = hidden_size
        self.activation_dtype = activation_dtype
        self.seq_divisor = seq_divisor
        self._schedules: dict[tuple, Any] = {}
        self._tied_parameter = tied_parameter
        self._embedding_group, self._embedding_is_copy = _embedding_group(groups, plan=plan,
                                                                          tied=tied_parameter is not None)
        # Fail now on a micro-batch count the schedule rejects (building one is local and cheap).
        self._build_schedule(1, seq_divisor, device=torch.device("cpu"))

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.local_model.parameters()).device

    @property
    def tied_embedding_copy(self) -> Optional[nn.Parameter]:
        """The last stage's copy of the embedding table on this rank, when it duplicates the first
        stage's on another rank (count it in no grad norm: its twin, after
        ``sync_tied_embedding_grads``, holds the same gradient); else None."""
        return self._tied_weight() if self._embedding_is_copy else None

    def _tied_weight(self) -> nn.Parameter:
        # Looked up at each use: DP wrapping (FSDP2) may replace the parameter after the runner is built.
        assert self._tied_parameter is not None
        return self.local_model.get_parameter(self._tied_parameter)

    # ------------------------------------------------------------------------------ training
    def step(self, micro_batches: list[dict], step_input: Any = None, *,
             keep_output_of: Optional[int] = None) -> PipelineStepOutput:
        """Forward and backward of this DP rank's micro-batches; accumulates into ``.grad``.

        Collective over the pipeline group. Every rank of the group passes the same micro-batches
        (dicts of [B, S] ``input_ids`` int64, ``labels`` int64, ``token_mask`` bool, optional
        ``position_ids``, ``mtp_labels``, ``mtp_input_ids``), all of one shape. ``step_input``
        reaches every stage for this step (``StageModule.step_input``; e.g. the global batch's token
        counts). ``keep_output_of``: a micro-batch index whose forward output every local stage keeps
        (``kept_outputs``).

        Raises:
            ValueError: the wrong number of micro-batches, or micro-batches of different shapes or
                missing keys.
        """
        B, S = self._check_micro_batches(micro_batches)
        schedule = self._schedule(B, S)
        for stage in self.stages:
            stage.step_input = step_input
            stage.record.clear()
            stage.record.keep_output_of = keep_output_of
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        kwargs = _stage_inputs(batch, self.device)
        # The last stage's forward returns the micro-batch objective; the "target" is unused.
        schedule.step(kwargs["input_ids"], target=kwargs["labels"], return_outputs=False, **kwargs)

        sums = None
        for stage in self.stages:
            assert len(stage.record.per_microbatch) == self.num_microbatches, "one forward per micro-batch and stage"
            assert stage.record.loss_sums is not None
            sums = stage.record.loss_sums if sums is None else sums + stage.record.loss_sums
        assert sums is not None
        if self.plan.pp_size > 1:
            # [n] float64 -> all_reduce(sum, pp) -> [n]: the last stage's terms and every stage's aux terms
            dist.all_reduce(sums, group=self.pp_group)
        per_microbatch = [
            [item for stage in self.stages for item in stage.record.per_microbatch[m]]
            for m in range(self.num_microbatches)
        ]
        kept = {stage.stage_index: stage.record.kept_output for stage in self.stages
                if stage.record.kept_output is not None}
        for stage in self.stages:
            stage.step_input = None
            stage.record.clear()
        return PipelineStepOutput(loss_sums=tuple(sums.tolist()), per_microbatch=per_microbatch,
                                  local_layer_ids=self.local_layer_ids, kept_outputs=kept)

    def run_isolated(self, micro_batch: dict, step_input: Any = None, *, stage_fn: StageFn, backward: bool = True,
                     param_grads: bool = False) -> list[StagePassResult]:
        """One micro-batch through every stage on its own, outside the schedule (forward in stage
        order, backward in reverse; ``longcat.distributed.pipeline_chain``): this rank's stages'
        results. Collective over the pipeline group; ``micro_batch`` as one of ``step``'s.

        Raises:
            ValueError: the micro-batch misses keys or is not [B, S].
        """
        _micro_batch_shape([micro_batch])
        return run_isolated(self, _stage_inputs(micro_batch, self.device), step_input, stage_fn=stage_fn,
                            backward=backward, param_grads=param_grads)

    def _check_micro_batches(self, micro_batches: list[dict]) -> tuple[int, int]:
        if len(micro_batches) != self.num_microbatches:
            raise ValueError(f"got {len(micro_batches)} micro-batches but the pipeline was built for "
                             f"num_microbatches={self.num_microbatches}")
        return _micro_batch_shape(micro_batches)

    def _schedule(self, B: int, S: int):
        """The schedule for [B, S] micro-batches (built once per shape: stage buffers are static)."""
        key = (B, S)
        if key not in self._schedules:
            if len(self._schedules) >= 4:
                self._schedules.clear()
            self._schedules[key] = self._build_schedule(B, S, device=self.device)
        return self._schedules[key]

    def _build_schedule(self, B: int, S: int, *, device: torch.device):
        if S % self.seq_divisor:
            raise ValueError(f"sequence length {S} is not divisible by tp={self.seq_divisor} (sequence parallelism)")
        act = torch.empty(B, S // self.seq_divisor, self.hidden_size, dtype=self.activation_dtype, device="meta",
                          requires_grad=True)
        ids = torch.empty(B, S, dtype=torch.int64, device="meta")
        loss = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
        pipeline_stages = [
            PipelineStage(stage, stage.stage_index, self.plan.num_stages, device,
                          input_args=ids if stage.is_first else act, output_args=loss if stage.is_last else act,
                          group=self.pp_group, dw_builder=None if stage.split_backward else _no_weight_pass)
            for stage in self.stages
        ]
        cls = _SCHEDULES[self.plan.schedule]
        target = pipeline_stages[0] if self.plan.schedule is PipelineSchedule.one_f_one_b else pipeline_stages
        schedule = cls(target, n_microbatches=self.num_microbatches, loss_fn=_objective_passthrough,
                       scale_grads=False)
        mapping = getattr(schedule, "stage_index_to_group_rank", None)
        if mapping is not None:
            assert tuple(mapping[s] for s in range(self.plan.num_stages)) == self.plan.stage_to_pp_rank, mapping
        return schedule

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def eval_loss(self, micro_batches: list[dict]) -> tuple[float, float]:
        """(sum of token cross-entropy, number of labelled tokens) over ``micro_batches`` (any count,
        one shape); identical on every rank of the pipeline group; sum over dp for the global value.

        A forward-only GPipe pass in rounds of ``num_microbatches``: each local stage runs every
        micro-batch of the round, receiving from and sending to the neighbouring stages' ranks.
        """
        B, S = _micro_batch_shape(micro_batches)
        totals_2 = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, len(micro_batches), self.num_microbatches):
            self._eval_round(micro_batches[start: start + self.num_microbatches], B=B, S=S, totals_2=totals_2)
        if self.plan.pp_size > 1:
            # [2] float64 -> all_reduce(sum, pp) -> [2]: only the last stage contributes
            dist.all_reduce(totals_2, group=self.pp_group)
        return float(totals_2[0]), float(totals_2[1])

    def _eval_round(self, micro_batches: list[dict], *, B: int, S: int, totals_2: torch.Tensor) -> None:
        # P2P order: each local stage, ascending, first posts the receives of all its inputs, then
        # sends each output as it is computed. Every pair of ranks then posts its transfers in the
        # same order (by stage, then micro-batch), which NCCL needs (its P2P ops run in posting order).
        device, ranks = self.device, self.plan.stage_to_pp_rank
        local_out: dict[int, torch.Tensor] = {}
        sends = []
        for stage in self.stages:
            s = stage.stage_index
            recvs = []
            if not stage.is_first and ranks[s - 1] != self.pp_rank:
                for _ in micro_batches:
                    buf = torch.empty(B, S // self.seq_divisor, self.hidden_size, dtype=self.activation_dtype,
                                      device=device)
                    # [B, S/sp, D] <- irecv(pp, from the previous stage's rank)
                    recv = dist.irecv(buf, group=self.pp_group, group_src=ranks[s - 1])
                    assert recv is not None  # None only on a rank outside pp_group
                    recvs.append((buf, recv))
            for m, mb in enumerate(micro_batches):
                if stage.is_first:
                    x = mb["input_ids"].to(device)
                elif recvs:
                    x, work = recvs[m]
                    work.wait()
                else:
                    x = local_out.pop(m)
                out = stage(x, evaluate=True, **_stage_inputs(mb, device))
                if stage.is_last:
                    totals_2 += out  # [2] float64: (loss sum, labelled tokens)
                elif ranks[s + 1] == self.pp_rank:
                    local_out[m] = out
                else:
                    # [B, S/sp, D] -> isend(pp, to the next stage's rank); waited at the round's end
                    send = dist.isend(out.contiguous(), group=self.pp_group, group_dst=ranks[s + 1])
                    assert send is not None  # None only on a rank outside pp_group
                    sends.append(send)
        for work in sends:
            work.wait()
        for stage in self.stages:  # an FSDP2 stage keeps what the forward gathered: free it
            for module in stage.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ------------------------------------------------------------------------------ grads
    def sync_tied_embedding_grads(self) -> None:
        """Sum the embedding gradient of the first stage and the last stage's copy (Megatron's
        embedding group), so both copies take the same optimizer step. Call after ``step`` and before
        the grad norm; it commutes with the DP all-reduce. Collective over the embedding group
        (a no-op on ranks outside it, and when the first and last stage share a rank)."""
        if self._embedding_group is None:
            return
        weight = self._tied_weight()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        # [V, D] (or this rank's TP / FSDP shard of it: both ends hold the same shard coordinates)
        #   -> all_reduce(sum, embedding group = {first-stage rank, last-stage rank}) -> [V, D]
        dist.all_reduce(_local(weight.grad), group=self._embedding_group)

    @torch.no_grad()
    def sync_tied_embedding_weights(self) -> None:
        """Copy the first stage's embedding table to the last stage's copy. ``build_pipeline`` calls it;
        call it again after initialising weights per rank (e.g. on a meta-built model)."""
        if self._embedding_group is None:
            return
        weight = self._tied_weight()
        # [V, D] (or its local shard) -> broadcast(embedding group, from the first stage's rank = group rank 0)
        dist.broadcast(_local(weight.data), group=self._embedding_group, group_src=0)

    def grad_norm_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters to count in the global grad norm: all of ``local_model`` except the
        last stage's copy of the tied embedding (its first-stage twin counts for both)."""
        skip = self.tied_embedding_copy
        return [p for p in self.local_model.parameters() if p is not skip]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global L2 norm of the gradients over the pipeline group (each parameter counted once),
        and ``torch.nn.utils.clip_grad_norm_``'s scaling by ``max_norm / (norm + 1e-6)`` when above
        ``max_norm`` (``0`` or ``inf`` = measure only, as ``optim.grad_clip=0``). Call after
        ``sync_tied_embedding_grads`` and the DP sync.
        For unsharded parameters only: with TP / EP / FSDP shards use ``longcat.distributed.grad_norm``
        and leave out ``tied_embedding_copy``."""
        grads = [p.grad for p in self.grad_norm_parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.detach().double().square().sum()
        if self.plan.pp_size > 1:
            dist.all_reduce(sq, group=self.pp_group)  # [] -> all_reduce(sum, pp) -> []
        norm = math.sqrt(float(sq))
        coef = max_norm / (norm + 1e-6)
        if 0 < coef < 1.0:
            for p in self.local_model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (FSDP2 / TP shards), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _no_weight_pass() -> Callable[[], None]:
    """``PipelineStage``'s ``dw_builder`` for a stage that must not split its backward
    (``StageModule.split_backward``): the input pass then runs the whole backward, the weight pass nothing."""
    return lambda: None


def _objective_passthrough(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward already returns the objective."""
    return output


def _stage_inputs(mb: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The [B, S] tensors every stage receives: input_ids, token_mask, labels (and those of
    ``_OPTIONAL_KEYS`` the micro-batch has)."""
    keys = _MICRO_BATCH_KEYS + tuple(k for k in _OPTIONAL_KEYS if k in mb)
    return {k: mb[k].to(device) for k in keys}


def _micro_batch_shape(micro_batches: list[dict]) -> tuple[int, int]:
    if not micro_batches:
        raise ValueError("no micro-batches given")
    first = micro_batches[0]
    missing = [k for k in _MICRO_BATCH_KEYS if k not in first]
    if missing:
        raise ValueError(f"micro-batch dicts need keys {_MICRO_BATCH_KEYS}; missing {missing}")
    shape = tuple(first["input_ids"].shape)
    for i, mb in enumerate(micro_batches):
        shapes = {k: tuple(mb[k].shape) for k in _MICRO_BATCH_KEYS}
        if set(shapes.values()) != {shape} or mb.keys() != first.keys():
            raise ValueError(f"micro-batch {i} has shapes {shapes} (keys {sorted(mb)}); the pipeline needs every "
                             f"micro-batch to be {shape} with keys {sorted(first)}")
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [B, S], got {shape}")
    return shape


def _embedding_group(groups: ProcessGroups, *, plan: StagePlan, tied: bool) -> tuple[Optional[dist.ProcessGroup], bool]:
    """(embedding group of this rank or None, whether this rank holds the last stage's copy).

    The group joins the ranks of the first and the last stage of each pipeline (same dp, tp
    coordinates). None where they share a rank (pp=1, ZB-V) or nothing is tied. Collective over the
    world when pp > 2 (``new_group`` for every pipeline)."""
    first_rank, last_rank = plan.stage_to_pp_rank[0], plan.stage_to_pp_rank[-1]
    if first_rank == last_rank or not tied:
        return None, False
    is_copy = groups.pp_rank == last_rank
    if plan.pp_size == 2:
        return groups.pp_group, is_copy
    pipelines = sorted({rank_layout(groups.dims, r).pp_ranks for r in range(groups.world_size)})
    group, _ = dist.new_subgroups_by_enumeration([[p[first_rank], p[last_rank]] for p in pipelines])
    member = groups.pp_rank in (first_rank, last_rank)
    return (group if member else None), is_copy
