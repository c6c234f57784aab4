"""The parallel plan of LongCat-Flash, applied in one place and in a fixed order.

    full model, built identically on every rank (same seed) and initialised
      -> TP: heads, FFNs, vocab split over tp, in place          (longcat.model.parallel.tensor_parallel)
      -> CP: every MLA block attends over the cp group           (longcat.model.parallel.context_parallel)
      -> EP: experts narrowed to this ep rank's ids, all-to-all dispatcher; MoE tokens split over tp;
             the ScMoE overlap schedule and chunks                (longcat.model.parallel.expert_parallel)
      -> (activation checkpointing is a model flag, already set)
      -> compile: torch.compile of the dense blocks, if asked      (longcat.model.compile)
      -> PP: this rank's pipeline stages of whole layers           (longcat.model.parallel.pipeline)
      -> DP: replicate (bucketed all-reduce) | fsdp (FSDP2; under PP one root per pipeline stage) |
             deepspeed (ZeRO-1/2, built with the optimizer: ``ParallelModel.attach_optimizer``)
                                                                   (longcat.distributed.data_parallel)

The stages are cut after TP and EP because a stage keeps references to the modules it runs and TP
replaces modules; cutting first would leave the stages with the unsharded ones.

Because every layout starts from the same single-process weights and only keeps its own pieces, a
sharded run computes what one process computes (tests/distributed/test_layouts.py).

Each parameter is then described by a ``ParamPlacement``: its global name, whether it is a routed
expert weight, the groups over which an identical copy lives (for the grad norm) and how to view a
local tensor shaped like it as the global tensor (a ``DTensor`` for checkpoints; DCP then reshards).

Gradient groups (docs/architecture.md): dense params sum over dp x cp (each cp rank saw S/cp tokens of
the same sequences); expert params over edp (= dp x cp x tp / ep: under TP each tp rank runs its own
1/tp slice of the MoE tokens).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from longcat.config.schema import ParallelConfig
from longcat.distributed.data_parallel import (
    DeepSpeedDP,
    DeepSpeedOptions,
    DPMode,
    ReplicatedGradSync,
    apply_fsdp,
)
from longcat.distributed.grad_norm import GradShard, clip_grads_, global_grad_norm
from longcat.distributed.groups import ProcessGroups
from longcat.distributed.parallel_dims import ParallelDims
from longcat.distributed.pipeline import PipelineRunner
from longcat.model.compile import compile_dense_blocks
from longcat.model.layer import DecoderLayer, as_decoder_layers
from longcat.model.model import LongcatFlashForCausalLM
from longcat.model.parallel.context_parallel import apply_context_parallel
from longcat.model.parallel.expert_parallel import (
    apply_expert_parallel,
    apply_moe_overlap,
    expert_param_global_info,
)
from longcat.model.parallel.pipeline import StageObjective, build_pipeline
from longcat.model.parallel.tensor_parallel import (
    apply_tensor_parallel,
    tp_param_global_info,
)

logger = logging.getLogger(__name__)

__all__ = ["ParallelModel", "ParamPlacement", "check_layout", "parallelize"]


@dataclass
class ParamPlacement:
    """One parameter of this rank, globally.

    Attributes:
        name: global name (``named_parameters`` of the unwrapped full model; global layer ids).
        param: the parameter (a ``DTensor`` under FSDP2 or DTensor-based TP, else a plain tensor).
        is_expert: a routed-expert weight (grads over edp).
        replicated_over: groups holding an identical copy of the local tensor (see ``grad_norm``).
        to_global: maps a local tensor shaped like ``param`` (the param, or an optimizer state) to
            one that describes the global tensor (identity for DTensors and whole tensors).
    """

    name: str
    param: nn.Parameter
    is_expert: bool
    replicated_over: tuple[str, ...]
    to_global: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)


@dataclass
class ParallelModel:
    """This rank's share of the model after ``parallelize``, and the DP machinery around it.

    Attributes:
        model: the whole model (without PP: call it) or, under PP, the pipeline's ``local_model``
            holding this rank's stages' modules under the full model's names (run it through
            ``pipeline``). Build the optimizer over it.
        groups: the process groups.
        dp_mode: replicate | fsdp | deepspeed.
        placements: every parameter of this rank, in a fixed order.
        grad_sync: the replicate-mode (and FSDP-ignored params') gradient sum, or None.
        pipeline: the ``PipelineRunner`` under PP, else None.
        deepspeed: the ``DeepSpeedDP`` engine once ``attach_optimizer`` ran in deepspeed mode.
    """

    model: nn.Module
    groups: ProcessGroups
    dp_mode: DPMode
    placements: list[ParamPlacement]
    grad_sync: Optional[ReplicatedGradSync] = None
    pipeline: Optional[PipelineRunner] = None
    deepspeed: Optional[DeepSpeedDP] = None
    deepspeed_options: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)

    # ------------------------------------------------------------------ optimizer side
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for p in self.placements:
            yield p.name, p.param

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, clip_grad: float) -> None:
        """Hand the optimizer to the DP engine (deepspeed mode builds its engine here)."""
        if self.dp_mode is DPMode.deepspeed:
            self.deepspeed = DeepSpeedDP(self.model, optimizer, dp_group=self.groups.dp_group,
                                         clip_grad=clip_grad, options=self.deepspeed_options)

    def backward(self, objective: torch.Tensor) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(objective)
        else:
            objective.backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.deepspeed is not None:
            # Not the torch optimizer's: its params are DeepSpeed's fp32 partitions, whose grads
            # ZeRO-Offload keeps allocated across steps.
            self.deepspeed.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    def reduce_clip_step(self, optimizer: torch.optim.Optimizer, *, max_norm: float,
                         skip_if: Optional[Callable[[float], bool]] = None) -> float:
        """Sum the gradients over DP, clip at the global norm and step. Returns the norm before clipping.

        ``skip_if(norm)`` (the non-finite guard; identical on every rank) returning True skips clipping
        and the optimizer step. DeepSpeed steps before the norm is known: it is called afterwards.
        """
        if self.deepspeed is not None:
            norm = self.deepspeed.step()
            if skip_if is not None:
                skip_if(norm)
            return norm
        if self.grad_sync is not None:
            self.grad_sync.sync()
        if self.pipeline is not None:
            self.pipeline.sync_tied_embedding_grads()
        norm = self.grad_norm()
        if skip_if is not None and skip_if(norm):
            return norm
        clip_grads_([p.param for p in self.placements], total_norm=norm, max_norm=max_norm)
        optimizer.step()
        return norm

    def grad_norm(self) -> float:
        """The global L2 norm of the gradient, every parameter counted once, identical on every rank."""
        g = self.groups
        coords = {"pp": g.pp_rank, "dp": g.dp_rank, "cp": g.cp_rank, "tp": g.tp_rank, "edp": g.edp_rank,
                  "ep": g.ep_rank}
        shards = [GradShard(p.param, p.replicated_over) for p in self.placements]
        return global_grad_norm(shards, coords=coords, world_group=g.world_group)

    def local_layers(self) -> list[DecoderLayer]:
        """This rank's decoder layers in global order (under PP: ``pipeline.local_layer_ids``)."""
        layers = self.model.get_submodule("model.layers")
        if self.pipeline is not None:
            assert isinstance(layers, nn.ModuleDict)  # the pipeline's local model keys them by global index
            return as_decoder_layers(layers[str(i)] for i in self.pipeline.local_layer_ids)
        assert isinstance(layers, nn.ModuleList)
        return as_decoder_layers(layers)

    def local_biases(self) -> list[torch.Tensor]:
        """Per local MoE layer (global order) its [E] fp32 ``e_score_correction_bias`` buffer."""
        return [layer.mlp.router.e_score_correction_bias for layer in self.local_layers()]

    @property
    def modules(self) -> list[nn.Module]:
        return [self.model]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


# ------------------------------------------------------------------------------- the plan


def parallelize(model: LongcatFlashForCausalLM, *, groups: ProcessGroups, options: ParallelConfig,
                num_microbatches: int = 1, objective: Optional[StageObjective] = None,
                compile_dense: bool = False) -> ParallelModel:
    """Apply TP -> CP -> EP -> PP -> DP to ``model`` (built and initialised identically on every rank).

    TP and EP go first, on the full model: ``apply_tensor_parallel`` swaps submodules, and the
    pipeline stages hold references to the modules they run. The non-local layers then simply go
    unused (build on the meta device and initialise per stage to save their memory).

    Args:
        model: a ``LongcatFlashForCausalLM`` holding the full single-process weights.
        groups: this job's process groups (``ProcessGroups.single()`` for one process).
        options: the run's ``parallel`` section (its modes; the degrees are ``groups``').
        num_microbatches, objective: the pipeline's (``build_pipeline``: micro-batches per step of
            this dp rank, the training objective the stages compute), used only when pp > 1.
        compile_dense: ``torch.compile`` the dense blocks (``train.compile``;
            ``longcat.model.compile.compile_dense_blocks``), after TP / CP / EP swapped their modules.

    Returns:
        The ``ParallelModel``; build the optimizer over its ``model`` afterwards, then call
        ``attach_optimizer``.

    Raises:
        ValueError: an unsupported combination (``check_layout``); pp > 1 without an objective.
    """
    dp_mode = check_layout(groups.dims, options)
    dims = groups.dims
    if dims.pp > 1 and objective is None:
        raise ValueError("parallelize with pp > 1 needs the training objective the pipeline stages compute")
    if dims.tp > 1:
        apply_tensor_parallel(model, groups=groups, sequence_parallel=options.sequence_parallel)
    if dims.cp > 1:
        apply_context_parallel(model, cp_group=groups.cp_group)
    if dims.ep > 1 or dims.tp > 1:  # under TP each tp rank dispatches its 1/tp of the MoE tokens
        apply_expert_parallel(model, groups=groups, dispatcher=options.moe_dispatcher)
    apply_moe_overlap(model, overlap=options.overlap_moe_comm, num_chunks=options.moe_chunks,
                      chunk_dim=options.moe_chunk_dim)
    if compile_dense:
        names = compile_dense_blocks(model)
        logger.info("train.compile: %d dense blocks compile at their first call (the first step takes longer)",
                    len(names))
    pipeline: Optional[PipelineRunner] = None
    local: nn.Module = model
    if dims.pp > 1:
        assert objective is not None
        pipeline = build_pipeline(model, groups=groups, schedule=options.pp_schedule,
                                  num_microbatches=num_microbatches, objective=objective,
                                  sequence_parallel=options.sequence_parallel and dims.tp > 1,
                                  compiled=compile_dense)
        local = pipeline.local_model
    # Where each local tensor sits globally, recorded before FSDP turns params into DTensors.
    inner = _inner_shards(local, groups)

    fsdp_ignored: list[nn.Parameter] = []
    if dp_mode is DPMode.fsdp and dims.dp * dims.cp > 1:
        if pipeline is None:
            layers = local.get_submodule("model.layers")
            assert isinstance(layers, nn.ModuleList)  # the full model's
            fsdp_ignored = _apply_fsdp_to(local, layers=layers, groups=groups)
        else:
            fsdp_ignored = _apply_fsdp_to_stages(pipeline, groups=groups)

    counted_once = set(map(id, pipeline.grad_norm_parameters())) if pipeline is not None else None
    placements = []
    for name, param in local.named_parameters():
        placement = _placement(name, param, inner.get(name), groups=groups)
        if counted_once is not None and id(param) not in counted_once:
            placement.replicated_over += ("pp",)  # the last stage's copy of the tied embedding
        placements.append(placement)

    grad_sync = None
    if dp_mode is DPMode.replicate or fsdp_ignored:
        only = set(map(id, fsdp_ignored)) if dp_mode is DPMode.fsdp else None
        pairs = [(p.param, groups.edp_group if p.is_expert else groups.dp_cp_group) for p in placements
                 if p.param.requires_grad and (only is None or id(p.param) in only)]
        grad_sync = ReplicatedGradSync(pairs)
    return ParallelModel(
        model=local, groups=groups, dp_mode=dp_mode, placements=placements, grad_sync=grad_sync, pipeline=pipeline,
        deepspeed_options=DeepSpeedOptions(zero_stage=options.zero_stage, offload_optimizer=options.offload_optimizer),
    )


def _apply_fsdp_to(root: nn.Module, *, layers: Iterable[nn.Module], groups: ProcessGroups,
                   reshard_after_forward: bool = True, keep_whole: Sequence[nn.Parameter] = ()) -> list[nn.Parameter]:
    """FSDP2 over dp (x cp) for ``root`` (the whole model, or one pipeline stage): each decoder layer of
    ``layers`` and the MTP head one unit, the rest the root unit. Experts are their own units over
    edp (their grads sum over edp, which under TP spans the tp ranks too); with edp = 1 they stay
    whole. Returns the parameters left unsharded (``apply_fsdp``)."""
    assert groups.dense_mesh is not None and groups.expert_mesh is not None  # ProcessGroups.build's, dp > 1
    decoder_layers = as_decoder_layers(layers)
    experts: list[nn.Module] = [layer.mlp.experts for layer in decoder_layers]
    mtp = getattr(root.get_submodule("model"), "mtp", None)
    blocks: list[nn.Module] = list(decoder_layers) + ([mtp] if mtp is not None else [])
    assert groups.dp_cp_mesh is not None
    return apply_fsdp(root, blocks=blocks, dp_mesh=groups.dp_cp_mesh, expert_modules=experts,
                      expert_mesh=groups.expert_mesh["edp"], reshard_after_forward=reshard_after_forward,
                      keep_whole=keep_whole)


def _apply_fsdp_to_stages(pipeline: PipelineRunner, *, groups: ProcessGroups) -> list[nn.Parameter]:
    """FSDP2 under PP: every pipeline stage module (each virtual stage of interleaved 1F1B / ZB-V) is
    its own FSDP root, so the ``torch.distributed.pipelining`` schedule drives it: no gradient
    reduce-scatter until a stage's last micro-batch backward, then one per unit (its REDUCE_GRAD).

    Units keep their gathered parameters from the first forward to the last backward of a step
    (``reshard_after_forward=False``, as torchtitan does under PP): one all-gather per unit per
    step instead of two per micro-batch, at the memory of unsharded stage weights during the step.

    A parameter two stages of this rank share (ZB-V puts the first and the last stage on one rank:
    the embedding table the last stage reads for MTP or a tied LM head) cannot belong to two FSDP
    roots: it stays whole and its gradient is summed over dp with the replicate mode's all-reduce.
    Returns the parameters left unsharded."""
    seen: set[int] = set()
    shared: list[nn.Parameter] = []
    for stage in pipeline.stages:
        for param in stage.parameters():
            if id(param) in seen and all(p is not param for p in shared):
                shared.append(param)
            seen.add(id(param))
    ignored: list[nn.Parameter] = []
    for stage in pipeline.stages:
        stage_layers = stage.get_submodule("model.layers")
        assert isinstance(stage_layers, nn.ModuleDict)  # keyed by global layer index
        ignored += _apply_fsdp_to(stage, layers=stage_layers.values(), groups=groups, reshard_after_forward=False,
                                  keep_whole=shared)
    unique = {id(p): p for p in ignored}
    return list(unique.values())


def check_layout(dims: ParallelDims, options: ParallelConfig) -> DPMode:
    """The DP mode, after checking that ``parallelize`` supports ``options`` on ``dims``' degrees
    (``ParallelConfig.validate``, which the run's configuration already passed).

    Raises:
        ValueError: DeepSpeed with tp/ep/pp (see ``ParallelConfig.validate``).
    """
    on_dims = dataclasses.replace(options, tp=dims.tp, pp=dims.pp, ep=dims.ep, dp=dims.dp, cp=dims.cp)
    on_dims.validate(world_size=dims.world_size)
    return DPMode(options.dp_mode)


@dataclass(frozen=True)
class _InnerShard:
    """A plain local tensor that is a piece of a global one: split along ``dim`` over mesh dim ``group``
    (tp or ep) into ``size`` even pieces, this rank's at ``coordinate``."""

    group: str
    dim: int
    size: int
    global_shape: tuple[int, ...]


def _inner_shards(local: nn.Module, groups: ProcessGroups) -> dict[str, _InnerShard]:
    out: dict[str, _InnerShard] = {}
    if groups.tp_size > 1:
        for name, tp_info in tp_param_global_info(local, groups).items():
            if tp_info.shard_dim is not None:
                out[name] = _InnerShard("tp", tp_info.shard_dim, groups.tp_size, tuple(tp_info.global_shape))
    if groups.ep_size > 1:
        for name, ep_info in expert_param_global_info(local, groups).items():
            out[name] = _InnerShard("ep", 0, groups.ep_size, tuple(ep_info.global_shape))
    return out


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _placement(name: str, param: nn.Parameter, inner: Optional[_InnerShard], *,
               groups: ProcessGroups) -> ParamPlacement:
    is_expert = _is_expert(name)
    family = ("edp", "ep") if is_expert else ("dp", "cp", "tp")
    sharded = _dtensor_sharded_dims(param) | ({inner.group} if inner is not None else set())
    replicated_over = tuple(d for d in family if d not in sharded)
    to_global = _identity if inner is None else _global_view(param, inner, groups=groups)
    return ParamPlacement(name, param, is_expert, replicated_over, to_global)


def _dtensor_sharded_dims(param: torch.Tensor) -> set[str]:
    """Mesh-dim names over which a DTensor is split (Shard / strided shard)."""
    if not isinstance(param, DTensor):
        return set()
    names = param.device_mesh.mesh_dim_names or ()
    sharded = {name for name, pl in zip(names, param.placements) if pl.is_shard()}
    if "dp_cp" in sharded:  # FSDP over the flattened dp x cp mesh
        sharded |= {"dp", "cp"}
    return sharded


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _global_view(param: torch.Tensor, inner: _InnerShard, *,
                 groups: ProcessGroups) -> Callable[[torch.Tensor], torch.Tensor]:
    """A map from a local tensor shaped like ``param`` to a ``DTensor`` of the global tensor.

    Without FSDP the local tensor is the tp/ep piece: ``[Shard(dim)]`` on that 1-D mesh. Under FSDP
    (``param`` a DTensor sharding the piece along dim 0 over dp / edp) it is a 2-D ``DTensor`` on
    (dp, tp) or (edp, ep): ``[Shard(0), Shard(dim)]``, or, when both split dim 0, the piece is split
    first (right to left): ``[_StridedShard(0, split_factor=size), Shard(0)]``, as FSDP2 + TP does.
    """
    mesh_root = groups.dense_mesh if inner.group == "tp" else groups.expert_mesh
    assert mesh_root is not None  # tp / ep > 1: ProcessGroups.build made the meshes
    shape = torch.Size(inner.global_shape)
    stride = torch.empty(shape, device="meta").stride()
    placements: list[Placement]
    if not isinstance(param, DTensor):
        mesh, placements = mesh_root[inner.group], [Shard(inner.dim)]
    else:
        # FSDP's 1-D mesh: dp (or cp, or the flattened dp_cp, under CP) for dense params, edp for experts
        outer_names = param.device_mesh.mesh_dim_names or ()
        outer_name = outer_names[0] if len(outer_names) == 1 else ""
        expected = ("dp", "cp", "dp_cp") if inner.group == "tp" else ("edp",)
        assert outer_name in expected and param.placements == (Shard(0),), (param.device_mesh, param.placements)
        mesh = mesh_root[outer_name, inner.group]
        outer = _StridedShard(0, split_factor=inner.size) if inner.dim == 0 else Shard(0)
        placements = [outer, Shard(inner.dim)]

    def to_global(local: torch.Tensor) -> torch.Tensor:
        if isinstance(local, DTensor):
            local = local.to_local()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    return to_global
