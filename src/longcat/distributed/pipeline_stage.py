"""Pipeline stages of LongCat-Flash: the stage plan and the module each stage runs.

A stage holds whole ScMoE decoder layers, a contiguous slice ``[s * L/N, (s+1) * L/N)`` of the
``L`` layers for stage ``s`` of ``N``. The first stage also holds the embedding; the last the final
norm, the LM head, the MTP head and (for MTP or tied embeddings) its own copy of the embedding table,
kept equal to the first stage's by ``PipelineRunner.sync_tied_embedding_grads`` (Megatron's
embedding group). Parameter names are the full model's (``model.layers.{global_idx}.*``), so
``torch.distributed.checkpoint`` state dicts move between pipeline layouts unchanged.

Every stage's forward computes its own part of the training objective (the same terms as
``Trainer.forward_backward``):

- the per-layer load-balance loss of its layers, which a non-last stage attaches to its output
  activation with ``_AttachAuxLoss`` (Megatron's ``MoEAuxLossAutoScaler``): the activation passes
  through unchanged and backward hands the aux loss a gradient of 1, so the routers' gradient flows
  with the activation gradient from the next stage;
- on the last stage: CE (+ MTP) over labels and the hidden z-loss on the pre-norm output, each
  normalised by the global batch's ``GlobalTokenCounts``; the forward returns the micro-batch's
  objective, which the schedule's loss function passes through and backpropagates.

Stage -> pipeline rank: ``loop`` (1F1B, interleaved 1F1B): stage s on rank ``s % pp``;
``v`` (ZB-V): stage s on rank ``s`` for ``s < pp``, else ``2 pp - 1 - s`` (first and last on rank 0).

Shape legend:
    B  micro-batch size
    S  sequence
    D  hidden_size
    V  vocab_size
    E  N + Z experts
    P  rotary pairs
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from longcat.config.schema import PipelineSchedule  # the parallel.pp_schedule enum, re-exported
from longcat.model.model import LongcatFlashForCausalLM, run_decoder_layers, run_mtp
from longcat.model.moe import MoEStats
from longcat.train import losses

__all__ = ["PipelineSchedule", "PipelineStageModule", "StageLossConfig", "StagePlan", "plan_stages"]


@dataclass(frozen=True)
class StagePlan:
    """Which layers each stage runs and which pipeline rank runs it.

    Attributes:
        num_stages: pp * stages_per_rank.
        stage_to_pp_rank: ``[num_stages]`` pipeline-group rank of each stage.
        layer_ranges: ``[num_stages]`` global layer indices of each stage.
    """

    schedule: PipelineSchedule
    pp_size: int
    num_stages: int
    stage_to_pp_rank: tuple[int, ...]
    layer_ranges: tuple[range, ...]

    def local_stages(self, pp_rank: int) -> tuple[int, ...]:
        """Stage indices held by ``pp_rank``, ascending."""
        return tuple(s for s, r in enumerate(self.stage_to_pp_rank) if r == pp_rank)

    def local_layers(self, pp_rank: int) -> tuple[int, ...]:
        """Global indices of the layers held by ``pp_rank``, ascending."""
        return tuple(i for s in self.local_stages(pp_rank) for i in self.layer_ranges[s])


def plan_stages(*, num_layers: int, pp_size: int, schedule: str | PipelineSchedule) -> StagePlan:
    """The stage plan for ``num_layers`` decoder layers over ``pp_size`` pipeline ranks.

    Raises:
        ValueError: an unknown schedule, pp_size < 1, or num_layers not divisible by the number of
            stages (pp_size times the schedule's stages per rank).
    """
    try:
        kind = PipelineSchedule(schedule)
    except ValueError:
        choices = " | ".join(s.value for s in PipelineSchedule)
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose one of {choices}") from None
    if pp_size < 1:
        raise ValueError(f"pp_size={pp_size} must be >= 1")
    num_stages = pp_size * kind.stages_per_rank
    if num_layers % num_stages:
        valid_pp = [p for p in range(1, num_layers + 1) if num_layers % (p * kind.stages_per_rank) == 0]
        raise ValueError(
            f"num_layers={num_layers} is not divisible by the {num_stages} pipeline stages "
            f"(pp={pp_size} x {kind.stages_per_rank} stage(s) per rank for schedule {kind.value!r}): "
            f"use a multiple of {num_stages} layers, or pp in {valid_pp}"
        )
    if kind.placement == "v":
        ranks = tuple(s if s < pp_size else 2 * pp_size - 1 - s for s in range(num_stages))
    else:
        ranks = tuple(s % pp_size for s in range(num_stages))
    per_stage = num_layers // num_stages
    layer_ranges = tuple(range(s * per_stage, (s + 1) * per_stage) for s in range(num_stages))
    return StagePlan(kind, pp_size, num_stages, ranks, layer_ranges)


@dataclass(frozen=True)
class StageLossConfig:
    """The objective's coefficients, as in ``Trainer.forward_backward``.

    lb_scale: ``lb_loss_coef / (micro-batches per DP rank * dp_size)``: the load-balance loss is
        averaged over the global batch's micro-batches.
    """

    mtp_weight: float
    z_loss_coef: float
    lb_loss_coef: float
    lb_scale: float
    n_routed_experts: int
    moe_topk: int
    expected_ffn_experts: float
    lb_num_groups: int


@dataclass
class StageRecord:
    """What one stage's training forwards leave for the runner during one step.

    moe_stats: per forward (= micro-batch, in order) the detached MoEStats of the stage's layers.
    loss_sums_4: float64 [4] running sums of the normalised (ce, mtp, z, lb) terms.
    """

    moe_stats: list[list[MoEStats]] = field(default_factory=list)
    loss_sums_4: Optional[torch.Tensor] = None


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``h`` whose backward also gives ``aux`` a gradient of 1 (Megatron-core
    ``MoEAuxLossAutoScaler``): an auxiliary loss computed inside a stage reaches its parameters
    during the pipeline's backward without travelling as a stage output. The output is a fresh
    (non-view) tensor because the zero-bubble backward detaches stage outputs in place."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return h.detach()

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_h, torch.ones(shape, dtype=dtype, device=device)


def _detached(stats: MoEStats) -> MoEStats:
    return MoEStats(expert_counts_E=stats.expert_counts_E.detach(), prob_sum_E=stats.prob_sum_E.detach(),
                    num_tokens=stats.num_tokens.detach(), ffn_per_token_T=stats.ffn_per_token_T.detach())


class PipelineStageModule(nn.Module):
    """One pipeline stage of a ``LongcatFlashForCausalLM``: the model's own submodules (shared, not
    copied), under the model's parameter names.

    forward(x, *, input_ids, token_mask, labels[, position_ids]):
        x: first stage int64 [B, S] token ids; other stages the previous stage's output [B, S, D].
        Returns [B, S, D] (non-last stage, with this stage's load-balance loss attached for backward)
        or the micro-batch's fp32 [] objective (last stage).
    The keyword tensors ([B, S] each) reach every stage: token_mask (MoE statistics, z-loss),
    labels (last stage), input_ids (the MTP head's next-token embedding on the last stage).

    Args:
        model: the full model; the stage takes references to the modules it runs.
        stage_index, num_stages: position in the pipeline.
        layer_ids: global indices of the decoder layers this stage runs.
        loss_cfg: the objective's coefficients.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (losses in fp32
            outside it, as the trainer does); None = no autocast.
        tp_group: for the vocab-parallel cross-entropy when ``model.logits_vocab_parallel`` (TP
            applied to ``model`` before the stages are cut).
    """

    def __init__(self, model: LongcatFlashForCausalLM, *, stage_index: int, num_stages: int,
                 layer_ids: range, loss_cfg: StageLossConfig, autocast_dtype: Optional[torch.dtype] = None,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.layer_ids = tuple(layer_ids)
        self.loss_cfg = loss_cfg
        self.autocast_dtype = autocast_dtype
        self.activation_checkpointing = model.model.activation_checkpointing
        self.activation_dtype = model.model.embed_tokens.weight.dtype  # what travels between stages
        self.rotary_emb = model.model.rotary_emb  # no parameters or buffers
        self.model = nn.Module()
        if self.is_first or (self.is_last and needs_embedding_on_last_stage(model)):
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layer_ids})
        if self.is_last:
            self.model.norm = model.model.norm
            self.model.mtp = model.model.mtp
            self.lm_head = model.lm_head
            # Under TP: vocab-sharded logits, and (SP) the gather of the sequence-sharded last hidden.
            self.logits_vocab_parallel = getattr(model, "logits_vocab_parallel", False)
            self.last_hidden_region = getattr(model, "last_hidden_region", nn.Identity())
            self.tp_group = tp_group
        self.counts: Optional[losses.GlobalTokenCounts] = None  # set by the runner per step
        self.record = StageRecord()

    # ---------------------------------------------------------------- pieces
    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def trunk(self, x: torch.Tensor, *, input_ids_BS: torch.Tensor, token_mask_BS: torch.Tensor,
              position_ids_BS: Optional[torch.Tensor] = None):
        """Embedding (first stage) and this stage's layers: -> (h_BSD, cos_BSP, sin_BSP, stats).

        x: first stage the token ids, else the previous stage's output ([B, S/tp, D] under SP)."""
        device = x.device
        S = input_ids_BS.shape[1]
        with self._autocast(device):
            h_BSD = self.model.embed_tokens(x) if self.is_first else x
            cos_BSP, sin_BSP = self.rotary_emb(position_ids_BS, seq_len=S, device=device, dtype=h_BSD.dtype)
            checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
            h_BSD, stats = run_decoder_layers(
                self.model.layers.values(), h_BSD, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                token_mask_BS=token_mask_BS, checkpointed=checkpointed,
            )
        return h_BSD, cos_BSP, sin_BSP, stats

    def heads(self, h_BSD: torch.Tensor, *, input_ids_BS: torch.Tensor, cos_BSP: torch.Tensor,
              sin_BSP: torch.Tensor, with_mtp: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Last stage: (logits_BSV, mtp_logits_BSV or None) from the pre-norm h_BSD."""
        assert self.is_last
        with self._autocast(h_BSD.device):
            logits_BSV = self.lm_head(self.model.norm(h_BSD))
            mtp_logits_BSV = None
            if with_mtp and self.model.mtp is not None:
                checkpointed = self.activation_checkpointing and torch.is_grad_enabled()
                mtp_hidden_BSD = run_mtp(self.model.mtp, self.model.embed_tokens, h_BSD, input_ids_BS=input_ids_BS,
                                         cos_BSP=cos_BSP, sin_BSP=sin_BSP, checkpointed=checkpointed)
                mtp_logits_BSV = self.lm_head(mtp_hidden_BSD)
        return logits_BSV, mtp_logits_BSV

    def ce_sum(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Summed token cross-entropy (fp32 []), vocab-parallel when the LM head is TP-sharded."""
        if self.logits_vocab_parallel:
            from longcat.distributed.tensor_parallel import vocab_parallel_cross_entropy_sum

            return vocab_parallel_cross_entropy_sum(logits_BSV, labels_BS, tp_group=self.tp_group)
        return losses.cross_entropy_sum(logits_BSV, labels_BS)

    def load_balance_loss(self, stats: list[MoEStats]) -> Optional[torch.Tensor]:
        """This stage's layers' load-balance loss for one micro-batch, scaled as in the trainer."""
        cfg = self.loss_cfg
        if cfg.lb_loss_coef <= 0 or not stats:
            return None
        total = sum(
            losses.load_balance_loss(
                s.expert_counts_E, s.prob_sum_E, s.num_tokens, n_routed_experts=cfg.n_routed_experts,
                moe_topk=cfg.moe_topk, expected_ffn_experts=cfg.expected_ffn_experts, num_groups=cfg.lb_num_groups)
            for s in stats
        )
        return total * cfg.lb_scale

    # ---------------------------------------------------------------- training forward
    def forward(self, x: torch.Tensor, *, input_ids: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h_BSD, cos_BSP, sin_BSP, stats = self.trunk(x, input_ids_BS=input_ids, token_mask_BS=token_mask,
                                                    position_ids_BS=position_ids)
        # Recorded here, outside any checkpointed region: a recompute in backward cannot add to them.
        self.record.moe_stats.append([_detached(s) for s in stats])
        lb = self.load_balance_loss(stats)
        zero = h_BSD.new_zeros((), dtype=torch.float32)
        if not self.is_last:
            if h_BSD.dtype != self.activation_dtype:
                raise RuntimeError(f"stage {self.stage_index} produced a {h_BSD.dtype} activation but the pipeline "
                                   f"exchanges {self.activation_dtype} (the parameters' dtype)")
            if lb is not None and torch.is_grad_enabled():
                h_BSD = _AttachAuxLoss.apply(h_BSD, lb)
            self._add_losses(zero, zero, zero, zero if lb is None else lb)
            return h_BSD
        cfg, counts = self.loss_cfg, self.counts
        assert counts is not None, "PipelineRunner.step sets the global token counts before the schedule runs"
        logits_BSV, mtp_logits_BSV = self.heads(h_BSD, input_ids_BS=input_ids, cos_BSP=cos_BSP, sin_BSP=sin_BSP,
                                                with_mtp=cfg.mtp_weight > 0)
        ce = self.ce_sum(logits_BSV, labels) / counts.num_labels
        objective = ce
        mtp = z = zero
        if mtp_logits_BSV is not None:
            mtp = cfg.mtp_weight * self.ce_sum(mtp_logits_BSV, losses.mtp_labels(labels)) / counts.num_mtp_labels
            objective = objective + mtp
        if cfg.z_loss_coef > 0:
            last_hidden_BSD = self.last_hidden_region(h_BSD)  # full [B, S, D] (gathered under SP)
            z = cfg.z_loss_coef * losses.hidden_z_loss_sum(last_hidden_BSD, token_mask) / counts.num_real
            objective = objective + z
        if lb is not None:
            objective = objective + lb
        self._add_losses(ce, mtp, z, zero if lb is None else lb)
        return objective

    def _add_losses(self, ce, mtp, z, lb) -> None:
        parts_4 = torch.stack([ce, mtp, z, lb]).detach().to(torch.float64)
        rec = self.record
        rec.loss_sums_4 = parts_4 if rec.loss_sums_4 is None else rec.loss_sums_4 + parts_4


def needs_embedding_on_last_stage(model: LongcatFlashForCausalLM) -> bool:
    """The last stage reads the embedding table for the MTP head's input or a tied LM head."""
    return model.model.mtp is not None or model.lm_head.weight is model.model.embed_tokens.weight
