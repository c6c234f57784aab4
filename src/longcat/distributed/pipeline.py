"""Pipeline parallelism for LongCat-Flash on ``torch.distributed.pipelining`` schedules.

``build_pipeline(model, groups=..., schedule=...)`` cuts the full model into stages of whole ScMoE
layers (``pipeline_stage``), and returns a ``PipelineRunner`` that runs one global batch's
micro-batches (those of this DP rank) through the schedule:

    1f1b              Schedule1F1B                one stage per rank
    interleaved_1f1b  ScheduleInterleaved1F1B     2 virtual stages per rank (loop placement)
    zbv               ScheduleZBVZeroBubble       2 stages per rank in a V, backward split into
                                                  input- and weight-gradient passes (V-ZB, as the paper)

The objective equals the non-pipelined trainer's (``Trainer.forward_backward``) term by term: CE,
MTP and hidden z-loss normalised by the global batch's ``GlobalTokenCounts`` (given per step), plus
the per-layer load-balance loss of every micro-batch, scaled by ``lb_loss_coef / (num_microbatches *
dp_size)``. Gradients are not rescaled by the schedule (``scale_grads=False``).

What the trainer does each step (see ``PipelineRunner``):

    counts = global token counts of the step (all-reduced over dp, as without PP)
    optimizer.zero_grad()
    out = runner.step(micro_batches, counts)          # forward + backward of all micro-batches
    controller.accumulate(...) from out.moe_stats     # this rank's layers: runner.local_layer_ids
    runner.sync_tied_embedding_grads()                # embedding group: first + last stage
    all-reduce every runner.local_model grad over dp  # (edp for experts once EP shards them)
    grad_norm = runner.clip_grad_norm_(clip)          # counts the tied embedding once (unsharded
                                                      # params; else grad_norm.py without
                                                      # runner.tied_embedding_copy)
    optimizer.step(); controller.step(runner.local_biases(), dp_group=...)

Shape legend:
    B  micro-batch size
    S  sequence
    D  hidden_size
    E  N + Z experts
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from longcat.config.schema import LossConfig, MoEConfig
from longcat.distributed.groups import ProcessGroups, rank_layout
from longcat.distributed.pipeline_stage import (
    PipelineSchedule,
    PipelineStageModule,
    StageLossConfig,
    StagePlan,
    needs_embedding_on_last_stage,
    plan_stages,
)
from longcat.model.model import LongcatFlashForCausalLM
from longcat.model.moe import MoEStats
from longcat.train import losses

__all__ = [
    "PipelineLosses",
    "PipelineRunner",
    "PipelineSchedule",
    "PipelineStepOutput",
    "StagePlan",
    "build_pipeline",
    "plan_stages",
]

logger = logging.getLogger(__name__)

_SCHEDULES = {
    PipelineSchedule.one_f_one_b: Schedule1F1B,
    PipelineSchedule.interleaved_1f1b: ScheduleInterleaved1F1B,
    PipelineSchedule.zbv: ScheduleZBVZeroBubble,
}
_MICRO_BATCH_KEYS = ("input_ids", "labels", "token_mask")


@dataclass(frozen=True)
class PipelineLosses:
    """Normalised loss terms of one step, summed over the micro-batches of this DP rank and over the
    pipeline stages (identical on every rank of the pipeline group; sum over dp for the global value)."""

    ce: float
    mtp: float
    z: float
    lb: float

    @property
    def total(self) -> float:
        return self.ce + self.mtp + self.z + self.lb


@dataclass
class PipelineStepOutput:
    """One ``PipelineRunner.step``.

    loss: the objective's terms (see ``PipelineLosses``).
    moe_stats: ``[micro-batch][local layer]`` detached MoEStats of this rank's layers (global ids in
        ``local_layer_ids``), one entry per real forward (activation recompute never adds one):
        feed ``expert_counts_E`` / ``num_tokens`` to the expert-bias controller.
    local_layer_ids: global indices of this rank's decoder layers, ascending.
    """

    loss: PipelineLosses
    moe_stats: list[list[MoEStats]]
    local_layer_ids: tuple[int, ...]


class PipelineRunner:
    """Runs this rank's pipeline stages under one schedule. Build with ``build_pipeline``.

    Attributes:
        plan: the stage plan (layers per stage, stage -> pipeline rank).
        stages: this rank's ``PipelineStageModule``s, ascending stage index.
        local_model: one ``nn.Module`` holding every parameter of this rank under the full model's
            names (``model.embed_tokens``, ``model.layers.{global_idx}``, ``model.norm``, ``model.mtp``,
            ``lm_head``): give it to the optimizer, the DP grad sync and ``torch.distributed.checkpoint``.
        local_layer_ids: global indices of this rank's decoder layers.
    """

    def __init__(self, model: LongcatFlashForCausalLM, *, groups: ProcessGroups, plan: StagePlan,
                 num_microbatches: int, loss_cfg: StageLossConfig, autocast_dtype: Optional[torch.dtype],
                 sequence_parallel: bool = False):
        self.plan = plan
        self.groups = groups
        self.pp_group = groups.pp_group
        self.pp_rank = groups.pp_rank
        self.num_microbatches = num_microbatches
        local = plan.local_stages(self.pp_rank)
        self.stages = [
            PipelineStageModule(model, stage_index=s, num_stages=plan.num_stages, layer_ids=plan.layer_ranges[s],
                                loss_cfg=loss_cfg, autocast_dtype=autocast_dtype, tp_group=groups.tp_group)
            for s in local
        ]
        self.local_layer_ids = plan.local_layers(self.pp_rank)
        self.local_model = _local_model(self.stages)
        self.hidden_size = model.cfg.hidden_size
        self.activation_dtype = model.model.embed_tokens.weight.dtype
        # Under sequence parallelism the activation between stages is this tp rank's [B, S/tp, D].
        self.seq_divisor = groups.tp_size if sequence_parallel else 1
        self._schedules: dict[tuple, Any] = {}
        self._embedding_group, self._embedding_is_copy = _embedding_group(model, groups=groups, plan=plan)

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.local_model.parameters()).device

    def local_layers(self) -> list[nn.Module]:
        """This rank's decoder layers in global order (``local_layer_ids``)."""
        layers = self.local_model.model.layers
        return [layers[str(i)] for i in self.local_layer_ids]

    def local_biases(self) -> list[torch.Tensor]:
        """Per local layer (``local_layer_ids`` order) the [E] ``e_score_correction_bias`` buffer."""
        return [layer.mlp.router.e_score_correction_bias for layer in self.local_layers()]

    @property
    def tied_embedding_copy(self) -> Optional[nn.Parameter]:
        """The last stage's copy of the embedding table on this rank, when it duplicates the first
        stage's on another rank (count it in no grad norm: its twin, after
        ``sync_tied_embedding_grads``, holds the same gradient); else None."""
        return self.local_model.model.embed_tokens.weight if self._embedding_is_copy else None

    # ------------------------------------------------------------------------------ training
    def step(self, micro_batches: list[dict], counts: losses.GlobalTokenCounts) -> PipelineStepOutput:
        """Forward and backward of this DP rank's micro-batches; accumulates into ``.grad``.

        Collective over the pipeline group. Every rank of the group passes the same micro-batches
        (dicts of [B, S] ``input_ids`` int64, ``labels`` int64 (-100 = no loss), ``token_mask`` bool,
        optional ``position_ids``), all of one shape.

        Raises:
            ValueError: the wrong number of micro-batches, or micro-batches of different shapes or
                missing keys.
        """
        B, S = self._check_micro_batches(micro_batches)
        schedule = self._schedule(B, S)
        for stage in self.stages:
            stage.counts = counts
            stage.record.moe_stats.clear()
            stage.record.loss_sums_4 = None
        device = self.device
        batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(device) for k in micro_batches[0]}
        kwargs = {"input_ids": batch["input_ids"], "token_mask": batch["token_mask"], "labels": batch["labels"]}
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        # The last stage's forward returns the micro-batch objective; the "target" is unused.
        schedule.step(batch["input_ids"], target=batch["labels"], return_outputs=False, **kwargs)

        sums_4 = torch.zeros(4, dtype=torch.float64, device=device)
        for stage in self.stages:
            assert len(stage.record.moe_stats) == self.num_microbatches, "one forward per micro-batch and stage"
            sums_4 += stage.record.loss_sums_4
        if self.plan.pp_size > 1:
            # [4] float64 -> all_reduce(sum, pp) -> [4]: ce/mtp/z from the last stage, lb from every stage
            dist.all_reduce(sums_4, group=self.pp_group)
        moe_stats = [
            [stats for stage in self.stages for stats in stage.record.moe_stats[m]]
            for m in range(self.num_microbatches)
        ]
        for stage in self.stages:
            stage.counts = None
            stage.record.moe_stats.clear()
        return PipelineStepOutput(loss=PipelineLosses(*sums_4.tolist()), moe_stats=moe_stats,
                                  local_layer_ids=self.local_layer_ids)

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
                          group=self.pp_group)
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
                    recvs.append((buf, dist.irecv(buf, group=self.pp_group, group_src=ranks[s - 1])))
            for m, mb in enumerate(micro_batches):
                input_ids_BS = mb["input_ids"].to(device)
                if stage.is_first:
                    x = input_ids_BS
                elif recvs:
                    x, work = recvs[m]
                    work.wait()
                else:
                    x = local_out.pop(m)
                position_ids_BS = mb["position_ids"].to(device) if "position_ids" in mb else None
                h_BSD, cos_BSP, sin_BSP, _ = stage.trunk(x, input_ids_BS=input_ids_BS,
                                                         token_mask_BS=mb["token_mask"].to(device),
                                                         position_ids_BS=position_ids_BS)
                if stage.is_last:
                    logits_BSV, _ = stage.heads(h_BSD, input_ids_BS=input_ids_BS, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                                                with_mtp=False)
                    labels_BS = mb["labels"].to(device)
                    totals_2[0] += stage.ce_sum(logits_BSV, labels_BS).double()
                    totals_2[1] += (labels_BS != losses.IGNORE_INDEX).sum()
                elif ranks[s + 1] == self.pp_rank:
                    local_out[m] = h_BSD
                else:
                    # [B, S/sp, D] -> isend(pp, to the next stage's rank); waited at the round's end
                    sends.append(dist.isend(h_BSD.contiguous(), group=self.pp_group, group_dst=ranks[s + 1]))
        for work in sends:
            work.wait()

    # ------------------------------------------------------------------------------ grads
    def sync_tied_embedding_grads(self) -> None:
        """Sum the embedding gradient of the first stage and the last stage's copy (Megatron's
        embedding group), so both copies take the same optimizer step. Call after ``step`` and before
        the grad norm; it commutes with the DP all-reduce. Collective over the embedding group
        (a no-op on ranks outside it, and when the first and last stage share a rank)."""
        if self._embedding_group is None:
            return
        weight = self.local_model.model.embed_tokens.weight
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
        weight = self.local_model.model.embed_tokens.weight
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
        ``max_norm`` (``0`` or ``inf`` = measure only, as ``optim.grad_clip=0``). Call after ``sync_tied_embedding_grads`` and the DP sync.
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


def _objective_passthrough(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward already returns the objective."""
    return output


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


def _local_model(stages: list[PipelineStageModule]) -> nn.Module:
    """One module over all local stages' submodules, named (and ordered) as in the full model."""
    children = {name: child for stage in stages for name, child in stage.model.named_children() if name != "layers"}
    local = nn.Module()
    local.model = nn.Module()
    if "embed_tokens" in children:
        local.model.embed_tokens = children["embed_tokens"]
    local.model.layers = nn.ModuleDict()
    for stage in stages:
        local.model.layers.update(stage.model.layers)
    for name in ("norm", "mtp"):
        if name in children:
            setattr(local.model, name, children[name])
    for stage in stages:
        if stage.is_last:
            local.lm_head = stage.lm_head
    return local


def _embedding_group(model: LongcatFlashForCausalLM, *, groups: ProcessGroups,
                     plan: StagePlan) -> tuple[Optional[dist.ProcessGroup], bool]:
    """(embedding group of this rank or None, whether this rank holds the last stage's copy).

    The group joins the ranks of the first and the last stage of each pipeline (same dp, tp
    coordinates). None where they share a rank (pp=1, ZB-V) or the last stage needs no embedding.
    Collective over the world when pp > 2 (``new_group`` for every pipeline)."""
    first_rank, last_rank = plan.stage_to_pp_rank[0], plan.stage_to_pp_rank[-1]
    if first_rank == last_rank or not needs_embedding_on_last_stage(model):
        return None, False
    is_copy = groups.pp_rank == last_rank
    if plan.pp_size == 2:
        return groups.pp_group, is_copy
    pipelines = sorted({rank_layout(groups.dims, r).pp_ranks for r in range(groups.world_size)})
    group, _ = dist.new_subgroups_by_enumeration([[p[first_rank], p[last_rank]] for p in pipelines])
    member = groups.pp_rank in (first_rank, last_rank)
    return (group if member else None), is_copy


def build_pipeline(model: LongcatFlashForCausalLM, *, groups: ProcessGroups, schedule: str | PipelineSchedule,
                   num_microbatches: int, loss_cfg: LossConfig, moe_cfg: MoEConfig,
                   autocast_dtype: Optional[torch.dtype] = None, sequence_parallel: bool = False) -> PipelineRunner:
    """Cut ``model`` into pipeline stages over ``groups.pp_group`` and return this rank's runner.

    Collective: call on every rank with the same arguments. ``model`` is the full model, identical on
    every rank (same seed and ``init_weights``, or a checkpoint); this rank's stages keep references
    to the modules they run, the rest can be dropped. Equal objective to ``Trainer.forward_backward``.

    Order with the other parallelisms: apply tensor parallelism to the full model *before* (the
    stages pick up its vocab-parallel embedding / LM head and its regions); expert parallelism and
    DP wrapping (of ``runner.stages`` or their layers) after.

    Args:
        model: the full ``LongcatFlashForCausalLM`` (its ``activation_checkpointing`` setting holds).
        groups: the job's process groups (pipeline = ``pp_group``; dp size for the LB average).
        schedule: ``"1f1b" | "interleaved_1f1b" | "zbv"``.
        num_microbatches: micro-batches per step of this DP rank (the trainer's grad-accumulation count).
        loss_cfg, moe_cfg: coefficients of the objective (as the trainer's ``cfg.loss``, ``cfg.moe``).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the stages under autocast (losses in fp32).
        sequence_parallel: TP was applied with sequence parallelism: stages exchange [B, S/tp, D].

    Raises:
        ValueError: unknown schedule; num_layers not divisible by the number of stages; a
            micro-batch count the schedule cannot run (e.g. 1F1B needs >= pp micro-batches).
    """
    cfg = model.cfg
    plan = plan_stages(num_layers=cfg.num_layers, pp_size=groups.pp_size, schedule=schedule)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
    if plan.schedule is PipelineSchedule.one_f_one_b and num_microbatches < plan.num_stages:
        raise ValueError(f"schedule '1f1b' needs num_microbatches >= pp={plan.num_stages}, got {num_microbatches}: "
                         "raise the gradient-accumulation steps or lower pp")
    stage_loss = StageLossConfig(
        mtp_weight=loss_cfg.mtp_weight, z_loss_coef=loss_cfg.z_loss_coef, lb_loss_coef=moe_cfg.lb_loss_coef,
        lb_scale=moe_cfg.lb_loss_coef / (num_microbatches * groups.dp_size),
        n_routed_experts=cfg.n_routed_experts, moe_topk=cfg.moe_topk,
        expected_ffn_experts=moe_cfg.expected_ffn_experts, lb_num_groups=moe_cfg.lb_num_groups or groups.ep_size,
    )
    runner = PipelineRunner(model, groups=groups, plan=plan, num_microbatches=num_microbatches,
                            loss_cfg=stage_loss, autocast_dtype=autocast_dtype, sequence_parallel=sequence_parallel)
    # Fail now on a micro-batch count the schedule rejects (building one is local and cheap).
    runner._build_schedule(1, runner.seq_divisor, device=torch.device("cpu"))
    if runner.device.type != "meta":
        runner.sync_tied_embedding_weights()
    logger.info("pipeline %s: stages %s on pp rank %d, layers %s", plan.schedule.value,
                plan.local_stages(groups.pp_rank), groups.pp_rank, runner.local_layer_ids)
    return runner
