"""Pipeline parallelism for LongCat-Flash: its stages and ``build_pipeline``.

``build_pipeline(model, groups=..., schedule=..., objective=...)`` cuts the full model into stages of
whole ScMoE layers and returns the generic ``longcat.distributed.pipeline.PipelineRunner`` over this
rank's stages. A stage holds the model's own submodules (shared, not copied) under the model's
parameter names (``model.layers.{global_idx}.*``), so ``torch.distributed.checkpoint`` state dicts
move between pipeline layouts unchanged. The first stage also holds the embedding; the last the final
norm, the LM head, the MTP head and (for MTP or tied embeddings) its own copy of the embedding table,
kept equal to the first stage's by ``PipelineRunner.sync_tied_embedding_grads`` (Megatron's embedding
group).

Every stage's forward computes its own part of the training objective, with the objective the
trainer passes down (``StageObjective``; ``longcat.train.objective.TrainingObjective``, the one the
plain step uses):

- the per-layer load-balance loss of its layers, with the alpha in use at that step; a non-last stage
  attaches it to its output activation (``attach_aux_loss``): the activation passes through
  unchanged and backward hands the aux loss a gradient of 1, so the routers' gradient flows with the
  activation gradient from the next stage;
- on the last stage: CE (+ MTP) over labels and the hidden z-loss on the pre-norm output, each
  normalised by the global batch's token counts (the runner's ``step_input``); the forward returns
  the micro-batch's objective, which the schedule's loss function passes through and backpropagates.

Each forward records the loss terms and the detached MoEStats of its layers (``StageRecord``): the
runner returns them per micro-batch for the expert-bias controller.

Shape legend:
    B  micro-batch size
    S  sequence
    D  hidden_size
    V  vocab_size
    P  rotary pairs
"""

from __future__ import annotations

import logging
from typing import Any, ContextManager, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import nn

from longcat.distributed.groups import ProcessGroups
from longcat.distributed.linear_cross_entropy import lm_head_cross_entropy_sum
from longcat.distributed.pipeline import PipelineRunner, StagePassOutput
from longcat.distributed.pipeline_stage import (
    PipelineSchedule,
    StageModule,
    attach_aux_loss,
    plan_stages,
)
from longcat.model.model import LongcatFlashForCausalLM, run_decoder_layers, run_mtp
from longcat.model.moe import MoEStats
from longcat.model.mtp import MTPHead

__all__ = ["PipelineStageModule", "StageHeads", "StageObjective", "build_pipeline", "needs_embedding_on_last_stage"]

logger = logging.getLogger(__name__)


class StageObjective(Protocol):
    """What a stage needs from the training objective (``longcat.train.objective.TrainingObjective``,
    injected by the trainer: the model layer does not import the training layer)."""

    @property
    def wants_mtp(self) -> bool: ...

    @property
    def wants_hidden_z(self) -> bool: ...

    @property
    def fused_head(self) -> bool: ...

    def mtp_labels_for(self, labels_BS: torch.Tensor,
                       mtp_labels_BS: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def autocast(self, device: torch.device) -> ContextManager[None]: ...

    def load_balance_loss(self, stats: Sequence[MoEStats]) -> Optional[torch.Tensor]: ...

    def head_loss(self, *, logits_BSV: Optional[torch.Tensor], mtp_logits_BSV: Optional[torch.Tensor],
                  last_hidden_BSD: Optional[torch.Tensor], labels_BS: torch.Tensor, token_mask_BS: torch.Tensor,
                  counts: Any,  # opaque here: the runner's step_input, the global batch's token counts
                  vocab_parallel: bool, lb: Optional[torch.Tensor],
                  mtp_labels_BS: Optional[torch.Tensor] = None, ce_sum: Optional[torch.Tensor] = None,
                  mtp_ce_sum: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def aux_terms(self, lb: Optional[torch.Tensor], *, like: torch.Tensor) -> torch.Tensor: ...

    def eval_sums(self, logits_BSV: Optional[torch.Tensor], labels_BS: torch.Tensor, *, vocab_parallel: bool,
                  ce_sum: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class StageHeads(NamedTuple):
    """The last stage's head outputs: the logits (``loss.lm_head_ce=logits``; [B, S, V], V/tp under TP)
    or the fused head's CE sums (fp32 []); the MTP ones None without the MTP head or its loss."""

    logits_BSV: Optional[torch.Tensor]
    mtp_logits_BSV: Optional[torch.Tensor]
    ce_sum: Optional[torch.Tensor]
    mtp_ce_sum: Optional[torch.Tensor]


def _detached(stats: MoEStats) -> MoEStats:
    return MoEStats(expert_counts_E=stats.expert_counts_E.detach(), prob_sum_E=stats.prob_sum_E.detach(),
                    num_tokens=stats.num_tokens.detach(), ffn_per_token_T=stats.ffn_per_token_T.detach())


class _StageModules(nn.Module):
    """A stage's share of ``LongcatFlashModel``, under its names: ``embed_tokens`` (first stage; last
    stage when it reads the table), ``layers`` (by global index), ``norm`` and ``mtp`` (last stage)."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleDict
    norm: nn.Module
    mtp: Optional[MTPHead]


class PipelineStageModule(StageModule):
    """One pipeline stage of a ``LongcatFlashForCausalLM`` (see the module docstring).

    forward(x, *, input_ids, token_mask, labels[, position_ids, mtp_labels, mtp_input_ids][, evaluate][, lm_only]):
        x: first stage int64 [B, S] token ids; other stages the previous stage's output [B, S, D]
        ([B, S/tp, D] under sequence parallelism). ``evaluate=True``: ``evaluate``'s result instead;
        ``lm_only=True``: ``forward_lm_only``'s (a ``StagePassOutput``). Both go through the module
        call so that the hooks of an FSDP2 root wrapping the stage gather its parameters first.
        Returns [B, S, D] (non-last stage, with this stage's load-balance loss attached for backward)
        or the micro-batch's fp32 [] objective (last stage).
    The keyword tensors ([B, S] each) reach every stage: token_mask (MoE statistics, z-loss),
    labels (last stage), input_ids (the MTP head's next-token embedding on the last stage). Under
    context parallelism S is this cp rank's S/cp tokens and the trainer adds what a shift along the
    global sequence needs: position_ids (global positions), mtp_labels and mtp_input_ids (the MTP
    head's labels and next-token ids, shifted on the global sequence before the split).

    Args:
        model: the full model; the stage takes references to the modules it runs.
        stage_index, num_stages: position in the pipeline.
        layer_ids: global indices of the decoder layers this stage runs.
        objective: the training objective (autocast, losses, the alpha in use).
    """

    def __init__(self, model: LongcatFlashForCausalLM, *, stage_index: int, num_stages: int, layer_ids: range,
                 objective: StageObjective):
        super().__init__(stage_index=stage_index, num_stages=num_stages)
        self.layer_ids = tuple(layer_ids)
        self.objective = objective
        self.activation_checkpointing = model.model.activation_checkpointing
        self.activation_dtype = model.model.embed_tokens.weight.dtype  # what travels between stages
        self.rotary_emb = model.model.rotary_emb  # no parameters or buffers
        self.model = _StageModules()
        if self.is_first or (self.is_last and needs_embedding_on_last_stage(model)):
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layer_ids})
        if self.is_last:
            self.model.norm = model.model.norm
            self.model.mtp = model.model.mtp
            self.lm_head = model.lm_head
            # Under TP: vocab-sharded logits, and (SP) the gather of the sequence-sharded last hidden.
            self.logits_vocab_parallel = model.logits_vocab_parallel
            self.last_hidden_region = model.last_hidden_region
            # A tied LM head whose table also embeds the MTP head's input: see StageModule.split_backward.
            # The fused head + CE is one autograd node for both the input's and the weight's gradient:
            # a split backward would run it twice (a second recompute of the logits), so its stage
            # keeps the whole backward in the input pass.
            self.split_backward = not (model.model.mtp is not None
                                       and model.lm_head.weight is model.model.embed_tokens.weight) \
                and not objective.fused_head

    # ---------------------------------------------------------------- pieces
    def trunk(self, x: torch.Tensor, *, input_ids_BS: torch.Tensor, token_mask_BS: torch.Tensor,
              position_ids_BS: Optional[torch.Tensor] = None):
        """Embedding (first stage) and this stage's layers: -> (h_BSD, cos_BSP, sin_BSP, stats).

        x: first stage the token ids, else the previous stage's output ([B, S/tp, D] under SP)."""
        device = x.device
        S = input_ids_BS.shape[1]
        with self.objective.autocast(device):
            h_BSD = self.model.embed_tokens(x) if self.is_first else x
            cos_BSP, sin_BSP = self.rotary_emb(position_ids_BS, seq_len=S, device=device, dtype=h_BSD.dtype)
            checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
            h_BSD, stats = run_decoder_layers(
                self.model.layers.values(), h_BSD, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                token_mask_BS=token_mask_BS, checkpointed=checkpointed,
            )
        return h_BSD, cos_BSP, sin_BSP, stats

    def heads(self, h_BSD: torch.Tensor, *, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
              cos_BSP: torch.Tensor, sin_BSP: torch.Tensor, with_mtp: bool,
              mtp_input_ids_BS: Optional[torch.Tensor] = None,
              mtp_labels_BS: Optional[torch.Tensor] = None) -> StageHeads:
        """Last stage: the LM (and with ``with_mtp`` the MTP) head on the pre-norm h_BSD: logits, or
        with the fused head (``objective.fused_head``) their CE sums against ``labels_BS`` and the MTP
        labels (``objective.mtp_labels_for(labels_BS, mtp_labels_BS)``). ``mtp_input_ids_BS``: the MTP
        head's next-token ids, default ``roll(input_ids_BS, -1)``."""
        assert self.is_last
        fused = self.objective.fused_head
        with self.objective.autocast(h_BSD.device):
            normed_BSD = self.model.norm(h_BSD)
            if fused:
                logits_BSV, ce_sum = None, lm_head_cross_entropy_sum(self.lm_head, normed_BSD, labels_BS)
            else:
                logits_BSV, ce_sum = self.lm_head(normed_BSD), None
            mtp_logits_BSV = mtp_ce_sum = None
            if with_mtp and self.model.mtp is not None:
                checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
                mtp_hidden_BSD = run_mtp(self.model.mtp, self.model.embed_tokens, h_BSD, input_ids_BS=input_ids_BS,
                                         cos_BSP=cos_BSP, sin_BSP=sin_BSP, checkpointed=checkpointed,
                                         next_input_ids_BS=mtp_input_ids_BS)
                if fused:
                    mtp_ce_sum = lm_head_cross_entropy_sum(
                        self.lm_head, mtp_hidden_BSD, self.objective.mtp_labels_for(labels_BS, mtp_labels_BS))
                else:
                    mtp_logits_BSV = self.lm_head(mtp_hidden_BSD)
        return StageHeads(logits_BSV, mtp_logits_BSV, ce_sum, mtp_ce_sum)

    # ---------------------------------------------------------------- training forward
    def forward(self, x: torch.Tensor, *, input_ids: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None, mtp_labels: Optional[torch.Tensor] = None,
                mtp_input_ids: Optional[torch.Tensor] = None, evaluate: bool = False,
                lm_only: bool = False) -> torch.Tensor | StagePassOutput:
        if evaluate:
            return self.evaluate(x, input_ids=input_ids, token_mask=token_mask, labels=labels,
                                 position_ids=position_ids)
        if lm_only:
            return self.forward_lm_only(x, input_ids=input_ids, token_mask=token_mask, labels=labels,
                                        position_ids=position_ids, mtp_labels=mtp_labels, mtp_input_ids=mtp_input_ids)
        h_BSD, cos_BSP, sin_BSP, stats = self.trunk(x, input_ids_BS=input_ids, token_mask_BS=token_mask,
                                                    position_ids_BS=position_ids)
        # Recorded here, outside any checkpointed region: a recompute in backward cannot add to them.
        reported = [_detached(s) for s in stats]
        objective = self.objective
        lb = objective.load_balance_loss(stats)
        if not self.is_last:
            if h_BSD.dtype != self.activation_dtype:
                raise RuntimeError(f"stage {self.stage_index} produced a {h_BSD.dtype} activation but the pipeline "
                                   f"exchanges {self.activation_dtype} (the parameters' dtype)")
            if lb is not None and torch.is_grad_enabled():
                h_BSD = attach_aux_loss(h_BSD, lb)
            self.record.add(objective.aux_terms(lb, like=h_BSD), reported, output=h_BSD)
            return h_BSD
        assert self.step_input is not None, "PipelineRunner.step sets the global token counts before the schedule runs"
        heads = self.heads(h_BSD, input_ids_BS=input_ids, labels_BS=labels, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                           with_mtp=objective.wants_mtp, mtp_input_ids_BS=mtp_input_ids, mtp_labels_BS=mtp_labels)
        # full [B, S, D] (gathered under SP); only when the hidden z-loss is on (a collective under SP)
        last_hidden_BSD = self.last_hidden_region(h_BSD) if objective.wants_hidden_z else None
        total, terms = objective.head_loss(
            logits_BSV=heads.logits_BSV, mtp_logits_BSV=heads.mtp_logits_BSV, last_hidden_BSD=last_hidden_BSD,
            labels_BS=labels, token_mask_BS=token_mask, counts=self.step_input,
            vocab_parallel=self.logits_vocab_parallel, lb=lb, mtp_labels_BS=mtp_labels, ce_sum=heads.ce_sum,
            mtp_ce_sum=heads.mtp_ce_sum)
        self.record.add(terms, reported, output=total)
        return total

    def forward_lm_only(self, x: torch.Tensor, *, input_ids: torch.Tensor, token_mask: torch.Tensor,
                        labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                        mtp_labels: Optional[torch.Tensor] = None,
                        mtp_input_ids: Optional[torch.Tensor] = None) -> StagePassOutput:
        """The training forward without any load-balance term, for R_g (Eq. 9) through
        ``PipelineRunner.run_isolated``: the activation [B, S, D] (nothing attached), or on the last
        stage the micro-batch's LM objective fp32 [] (CE + MTP + hidden z, as the plain step's
        ``lm_terms``). ``watched``: each local layer's router probabilities [T, E]; ``report``: the
        layers' MoEStats (with ``probs_TE`` and their graph). Records nothing. Call it as
        ``stage(x, lm_only=True, ...)`` (through FSDP2's hooks)."""
        h_BSD, cos_BSP, sin_BSP, stats = self.trunk(x, input_ids_BS=input_ids, token_mask_BS=token_mask,
                                                    position_ids_BS=position_ids)
        watched = [s.probs_TE for s in stats if s.probs_TE is not None]
        if not self.is_last:
            return StagePassOutput(output=h_BSD, watched=watched, report=list(stats))
        assert self.step_input is not None, "run_isolated sets the global token counts"
        heads = self.heads(h_BSD, input_ids_BS=input_ids, labels_BS=labels, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                           with_mtp=self.objective.wants_mtp, mtp_input_ids_BS=mtp_input_ids, mtp_labels_BS=mtp_labels)
        last_hidden_BSD = self.last_hidden_region(h_BSD) if self.objective.wants_hidden_z else None
        total, _ = self.objective.head_loss(
            logits_BSV=heads.logits_BSV, mtp_logits_BSV=heads.mtp_logits_BSV, last_hidden_BSD=last_hidden_BSD,
            labels_BS=labels, token_mask_BS=token_mask, counts=self.step_input,
            vocab_parallel=self.logits_vocab_parallel, lb=None, mtp_labels_BS=mtp_labels, ce_sum=heads.ce_sum,
            mtp_ce_sum=heads.mtp_ce_sum)
        return StagePassOutput(output=total, watched=watched, report=list(stats))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, *, input_ids: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None, mtp_labels: Optional[torch.Tensor] = None,
                 mtp_input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The activation [B, S, D], or on the last stage float64 [2] (CE sum, labelled tokens)."""
        h_BSD, cos_BSP, sin_BSP, _ = self.trunk(x, input_ids_BS=input_ids, token_mask_BS=token_mask,
                                                position_ids_BS=position_ids)
        if not self.is_last:
            return h_BSD
        heads = self.heads(h_BSD, input_ids_BS=input_ids, labels_BS=labels, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                           with_mtp=False)
        return self.objective.eval_sums(heads.logits_BSV, labels, vocab_parallel=self.logits_vocab_parallel,
                                        ce_sum=heads.ce_sum)


def needs_embedding_on_last_stage(model: LongcatFlashForCausalLM) -> bool:
    """The last stage reads the embedding table for the MTP head's input or a tied LM head."""
    return model.model.mtp is not None or model.lm_head.weight is model.model.embed_tokens.weight


def _local_model(stages: list[PipelineStageModule]) -> nn.Module:
    """One module over all local stages' submodules, named (and ordered) as in the full model."""
    children = {name: child for stage in stages for name, child in stage.model.named_children() if name != "layers"}
    local = nn.Module()
    local.model = nn.Module()
    if "embed_tokens" in children:
        local.model.embed_tokens = children["embed_tokens"]
    local.model.layers = nn.ModuleDict()
    for stage in stages:
        local.model.layers.update(dict(stage.model.layers.items()))  # the annotation takes a Mapping only
    for name in ("norm", "mtp"):
        if name in children:
            setattr(local.model, name, children[name])
    for stage in stages:
        if stage.is_last:
            local.lm_head = stage.lm_head
    return local


def build_pipeline(model: LongcatFlashForCausalLM, *, groups: ProcessGroups, schedule: str | PipelineSchedule,
                   num_microbatches: int, objective: StageObjective, sequence_parallel: bool = False,
                   compiled: bool = False) -> PipelineRunner:
    """Cut ``model`` into pipeline stages over ``groups.pp_group`` and return this rank's runner.

    Collective: call on every rank with the same arguments. ``model`` is the full model, identical on
    every rank (same seed and ``init_weights``, or a checkpoint); this rank's stages keep references
    to the modules they run, the rest can be dropped. The objective is the plain step's
    (``Trainer.forward_backward``); ``runner.step(micro_batches, counts)`` takes the global batch's
    ``GlobalTokenCounts`` and returns the loss sums in ``objective.TERM_NAMES`` order and, per
    micro-batch, the detached MoEStats of this rank's layers (``local_layer_ids``).

    Order with the other parallelisms: apply tensor parallelism to the full model *before* (the
    stages pick up its vocab-parallel embedding / LM head and its regions); expert parallelism and
    DP wrapping (of ``runner.stages`` or their layers) after.

    Args:
        model: the full ``LongcatFlashForCausalLM`` (its ``activation_checkpointing`` setting holds).
        groups: the job's process groups (pipeline = ``pp_group``).
        schedule: ``"1f1b" | "interleaved_1f1b" | "zbv"``.
        num_microbatches: micro-batches per step of this DP rank (the trainer's grad-accumulation count).
        objective: the training objective (built for ``num_microbatches`` and the dp size).
        sequence_parallel: TP was applied with sequence parallelism: stages exchange [B, S/tp, D].
        compiled: the dense blocks are compiled (``train.compile``): no stage splits its backward for
            the zero-bubble schedules (a compiled block's backward is one node for the input and the
            weight gradients; split, pp x tp x SP under ZB-V gave wrong gradients).

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
    stages = [
        PipelineStageModule(model, stage_index=s, num_stages=plan.num_stages, layer_ids=plan.layer_ranges[s],
                            objective=objective)
        for s in plan.local_stages(groups.pp_rank)
    ]
    if compiled:
        for stage in stages:
            stage.split_backward = False
    tied = "model.embed_tokens.weight" if needs_embedding_on_last_stage(model) else None
    runner = PipelineRunner(
        stages, plan=plan, groups=groups, num_microbatches=num_microbatches, local_model=_local_model(stages),
        hidden_size=cfg.hidden_size, activation_dtype=model.model.embed_tokens.weight.dtype,
        seq_divisor=groups.tp_size if sequence_parallel else 1, tied_parameter=tied)
    if runner.device.type != "meta":
        runner.sync_tied_embedding_weights()
    logger.info("pipeline %s: stages %s on pp rank %d, layers %s", plan.schedule.value,
                plan.local_stages(groups.pp_rank), groups.pp_rank, runner.local_layer_ids)
    return runner
