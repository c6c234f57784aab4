"""Build one rank's real shards of a production layout in one CPU process, allocating nothing.

PyTorch's fake process-group backend (``torch.testing._internal.distributed.fake_pg``) stands in for
the job: ``init_process_group("fake", rank=R, world_size=N)`` succeeds without peers, every
collective on it completes at once without moving data. ``ProcessGroups.build`` then makes rank R's
meshes and groups exactly as in training, the model is built on the meta device (shapes, no
storage), and ``parallelize`` applies TP, EP, PP and FSDP as the trainer does. What the rank keeps
is counted from the resulting ``ParallelModel.placements`` (local shards: a ``DTensor``'s local
part under FSDP, the narrowed tensor under TP / EP, only this rank's pipeline stages).

Nothing else of training is touched: no initialisation (meta tensors have no values), no optimizer
(its state is counted analytically: AdamW's two fp32 moments and a 0-d fp32 step per tensor, which
is what ``torch.optim.AdamW`` creates on the first step), no data.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longcat.config.schema import DPMode, RunConfig, num_grad_accum_steps
from longcat.distributed import ParallelDims, ProcessGroups
from longcat.model import LongcatFlashForCausalLM
from longcat.model.parallel.parallelize import parallelize
from longcat.train.objective import TrainingObjective

__all__ = ["ParamSplit", "RankShard", "build_rank_shard", "fake_process_groups", "param_kind"]


@dataclass(frozen=True)
class ParamSplit:
    """Parameter scalars by kind (numbers of elements, not bytes).

    dense: attention, dense FFNs, router, norms, MTP head (everything not below).
    experts: routed FFN experts (``.mlp.experts.``). embedding: the input table (and the last stage's
    tied copy). head: the LM head.
    """

    dense: int = 0
    experts: int = 0
    embedding: int = 0
    head: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.experts + self.embedding + self.head

    def add(self, kind: str, numel: int) -> ParamSplit:
        return dataclasses.replace(self, **{kind: getattr(self, kind) + numel})


def param_kind(name: str) -> str:
    """``experts`` | ``embedding`` | ``head`` | ``dense`` for a parameter's global name."""
    if ".mlp.experts." in name:
        return "experts"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    return "dense"


@dataclass(frozen=True)
class RankShard:
    """What one rank holds after the real ``parallelize`` (counted on the meta device).

    Attributes:
        rank: the global rank. dims: the layout's degrees.
        pp_rank, tp_rank, ep_rank: its coordinates.
        local_layers: global ids of its decoder layers (all of them without PP).
        first_stage, last_stage: it holds the embedding lookup / the LM head, loss and MTP head.
        params: local parameter scalars by kind (shards: what this rank stores).
        num_param_tensors: local parameter tensors (AdamW keeps one 0-d step tensor per tensor).
        sharded_over_dp: ``dp_mode=fsdp`` with dp > 1 (FSDP2 shards weights, grads and optimizer state).
        model_params: parameters of the whole, unsharded model.
        num_microbatches: micro-batches per optimizer step on this dp rank.
    """

    rank: int
    dims: ParallelDims
    pp_rank: int
    tp_rank: int
    ep_rank: int
    local_layers: tuple[int, ...]
    first_stage: bool
    last_stage: bool
    params: ParamSplit
    num_param_tensors: int
    sharded_over_dp: bool
    model_params: int
    num_microbatches: int


@contextlib.contextmanager
def fake_process_groups(dims: ParallelDims, *, rank: int) -> Iterator[ProcessGroups]:
    """Rank ``rank``'s ``ProcessGroups`` of a ``dims.world_size``-rank job, on the fake backend.

    Collectives complete immediately and move no data. The default process group is destroyed on exit.

    Raises:
        ValueError: ``rank`` outside [0, world_size); torch.distributed is already initialised in this
            process (the dry run needs its own default group: run it in a process of its own).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < dims.world_size:
        raise ValueError(f"--rank {rank} is outside [0, world_size={dims.world_size}): pick a rank below "
                         f"{dims.world_size}")
    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process; run the dry run in a "
                         "process of its own (it installs a fake default process group)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        yield ProcessGroups.build(dims, device_type="cpu")
    finally:
        dist.destroy_process_group()


def build_rank_shard(run_cfg: RunConfig, *, world_size: int, rank: int) -> RankShard:
    """Build rank ``rank``'s shards of ``run_cfg`` on ``world_size`` ranks (meta device, fake groups).

    ``run_cfg`` must already be valid for ``world_size`` (``longcat.config.validate``).

    Raises:
        ValueError: see ``fake_process_groups``; whatever ``parallelize`` refuses.
    """
    dims = ParallelDims.from_config(run_cfg.parallel, world_size=world_size)
    accum = num_grad_accum_steps(run_cfg, dp=dims.dp)
    with fake_process_groups(dims, rank=rank) as groups:
        with torch.device("meta"):
            model = LongcatFlashForCausalLM(run_cfg.model,
                                            activation_checkpointing=run_cfg.train.activation_checkpointing)
        model_params = sum(p.numel() for p in model.parameters())
        objective = TrainingObjective(
            loss_cfg=run_cfg.loss, moe_cfg=run_cfg.moe, model_cfg=run_cfg.model, num_microbatches=accum,
            dp_size=dims.dp, ep_size=dims.ep, tp_group=groups.tp_group,
            autocast_dtype=torch.bfloat16 if run_cfg.train.bf16 else None, lb_coef=lambda: run_cfg.moe.lb_loss_coef)
        parallel = parallelize(model, groups=groups, options=run_cfg.parallel, num_microbatches=accum,
                               objective=objective)
        split = ParamSplit()
        for placement in parallel.placements:
            param = placement.param
            local = param.to_local() if isinstance(param, DTensor) else param
            split = split.add(param_kind(placement.name), local.numel())
        first_stage = last_stage = True
        local_layers = tuple(range(run_cfg.model.num_layers))
        if parallel.pipeline is not None:
            plan = parallel.pipeline.plan
            local_layers = tuple(parallel.pipeline.local_layer_ids)
            stages = plan.local_stages(groups.pp_rank)
            first_stage, last_stage = 0 in stages, plan.num_stages - 1 in stages
        return RankShard(
            rank=rank, dims=dims, pp_rank=groups.pp_rank, tp_rank=groups.tp_rank, ep_rank=groups.ep_rank,
            local_layers=local_layers, first_stage=first_stage, last_stage=last_stage, params=split,
            num_param_tensors=len(parallel.placements),
            sharded_over_dp=DPMode(run_cfg.parallel.dp_mode) is DPMode.fsdp and dims.dp > 1,
            model_params=model_params, num_microbatches=accum)
