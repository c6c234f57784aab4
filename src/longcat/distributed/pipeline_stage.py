"""What a pipeline stage is, model-agnostic: the stage plan, the stage module's contract, and the
auxiliary-loss trick.

A stage holds a contiguous slice ``[s * L/N, (s+1) * L/N)`` of the ``L`` repeated blocks (decoder
layers) for stage ``s`` of ``N``; the model decides what else the first and the last stage hold
(embedding, head, loss). Stage -> pipeline rank: ``loop`` (1F1B, interleaved 1F1B): stage s on rank
``s % pp``; ``v`` (ZB-V): stage s on rank ``s`` for ``s < pp``, else ``2 pp - 1 - s`` (first and last
on rank 0).

A stage module (``StageModule``) computes its own part of the training objective in its forward and
keeps what the caller needs afterwards in its ``StageRecord``: running sums of its loss terms and,
per micro-batch, whatever the model reports (e.g. router statistics). A non-last stage attaches its
auxiliary loss to its output activation with ``attach_aux_loss`` (Megatron's
``MoEAuxLossAutoScaler``); the last stage returns the micro-batch's objective.

Shape legend:
    B  micro-batch size
    S  sequence (S/tp under sequence parallelism)
    D  hidden size
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from longcat.config.schema import (
    PipelineSchedule,  # the parallel.pp_schedule enum, re-exported
)

__all__ = ["PipelineSchedule", "StageModule", "StagePlan", "StageRecord", "attach_aux_loss", "plan_stages"]


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
    """The stage plan for ``num_layers`` repeated blocks (decoder layers) over ``pp_size`` pipeline ranks.

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


@dataclass
class StageRecord:
    """What one stage's training forwards leave for the runner during one step.

    loss_sums: float64 [n] running sums of the stage's (detached, normalised) loss terms; n and their
        order are the objective's.
    per_microbatch: per training forward (= micro-batch, in order) what the stage reports for it
        (LongCat-Flash: the detached MoEStats of the stage's layers).
    """

    loss_sums: Optional[torch.Tensor] = None
    per_microbatch: list[list[Any]] = field(default_factory=list)

    def add(self, loss_terms: torch.Tensor, reported: list[Any]) -> None:
        """One forward's loss terms ([n], detached) and report."""
        terms = loss_terms.detach().to(torch.float64)
        self.loss_sums = terms if self.loss_sums is None else self.loss_sums + terms
        self.per_microbatch.append(reported)

    def clear(self) -> None:
        self.loss_sums = None
        self.per_microbatch.clear()


class StageModule(nn.Module):
    """Base of one pipeline stage's module; ``PipelineRunner`` drives it.

    Subclasses implement:
        ``forward(x, *, input_ids, token_mask, labels[, position_ids])`` (training): x is int64
            [B, S] token ids on the first stage, else the previous stage's activation [B, S, D];
            returns the activation [B, S, D] (with the stage's auxiliary loss attached) or, on the
            last stage, the micro-batch's fp32 [] objective. It calls ``record.add`` once per forward
            (not in a recompute).
        ``evaluate(x, ...)`` (the same inputs; no grad): the activation, or on the last stage
            float64 [2] (loss sum, number of labelled tokens). ``forward(x, ..., evaluate=True)``
            returns the same: the runner evaluates through the module call, so that the hooks of an
            FSDP2 root wrapping the stage (``fully_shard``) gather its parameters first.
    The keyword inputs are the micro-batch's [B, S] tensors (every stage gets them all).
    ``step_input`` is set by the runner for one step (e.g. the global batch's token counts) and
    cleared afterwards.

    ``split_backward`` (default True): whether the zero-bubble schedules may split this stage's
    backward into an input-gradient and a weight-gradient pass. ``torch.distributed.pipelining``
    computes the weight pass per group of parameters, each group walking its own part of the
    graph once; a parameter used both near the stage's input and near its output (a tied LM head
    that also embeds the MTP head's input) makes two groups walk the same nodes and fails. A
    subclass sets it False for such a stage: its whole backward then runs in the input pass.
    """

    def __init__(self, *, stage_index: int, num_stages: int) -> None:
        super().__init__()
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.record = StageRecord()
        self.step_input: Any = None  # opaque here: the objective's per-step input
        self.split_backward = True

    def evaluate(self, x: torch.Tensor, *, input_ids: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


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


def attach_aux_loss(h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``h`` unchanged (a fresh tensor); in backward ``aux`` also gets a gradient of 1."""
    return _AttachAuxLoss.apply(h, aux)
