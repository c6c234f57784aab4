"""Expert parallelism for LongCat-Flash: the in-place EP (and MoE-under-TP) plan, the ScMoE overlap
switch, and the global description of expert shards for checkpoints.

Layout (docs/architecture.md): the N FFN experts of every MoE are sharded over the ep group
by global id, ep rank r holding ``[r * N/ep, (r + 1) * N/ep)``, and replicated over edp. Zero
experts are never sharded or sent. The exchange itself is the token dispatcher's
(``longcat.model.moe.dispatch``: ``AllToAllTokenDispatcher``, or with ``parallel.moe_chunks`` > 1
``ChunkedAllToAllTokenDispatcher`` (chunks of local experts) / ``TokenChunkedTokenDispatcher``
(chunks of tokens); ``AllGatherTokenDispatcher`` with ``parallel.moe_dispatcher=allgather``).

Gradient rules for the integration code (see ``apply_expert_parallel``): expert weights hold
per-shard grads, sum them over ``edp_group``; the router (like every dense replicated weight)
already has the full tp-replicated grad, sum it over ``dp_group`` only.

Checkpoints. Expert parameters stay plain local tensors (``[N/ep, ...]`` under the same names), so
the optimizer, grad clipping, FSDP and flat-buffer grad sync see ordinary tensors.
``expert_param_global_info`` maps each name to ``ExpertShard(global_shape, offset)`` (rows
``offset : offset + N/ep`` of the global ``[N, ...]`` tensor), and ``expert_shard_to_dtensor`` wraps a
local weight or optimizer state as a ``DTensor`` on the ``("edp", "ep")`` expert sub-mesh with
``[Replicate(), Shard(0)]`` at save/load time, which ``torch.distributed.checkpoint`` saves as one
global tensor and reshards on load (tested on gloo: saved at ep=2, loaded as full tensors). A plain
local expert tensor handed to DCP unwrapped would be taken as replicated: only one shard saved.

Shape legend:
    N  FFN experts in total; L = N / ep local experts per rank
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from longcat.config.schema import MoEChunkDim, MoEDispatcher
from longcat.distributed.groups import ProcessGroups
from longcat.model.layer import DecoderLayer
from longcat.model.moe import MoE
from longcat.model.moe.dispatch import (
    AllGatherTokenDispatcher,
    AllToAllTokenDispatcher,
    ChunkedAllToAllTokenDispatcher,
    TokenChunkedTokenDispatcher,
)

__all__ = [
    "ExpertShard",
    "apply_expert_parallel",
    "apply_moe_overlap",
    "expert_param_global_info",
    "expert_shard_to_dtensor",
]

_EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------- the plan


def apply_expert_parallel(
    model: nn.Module, *, groups: ProcessGroups, dispatcher: MoEDispatcher | str = MoEDispatcher.alltoall
) -> None:
    """Shard every MoE's experts over ``groups.ep_group`` and split its tokens over ``groups.tp_group``
    (in place). Call once, after the model holds its full weights (identical on every rank) or on
    the meta device, and before building the optimizer (expert parameters are replaced).

    Per MoE (``longcat.model.moe.MoE``):
    - ep > 1: ``experts`` keeps rows ``[ep_rank * N/ep, (ep_rank + 1) * N/ep)`` of each weight
      (names unchanged: ``...mlp.experts.gate_proj`` now ``[N/ep, I, D]``; ``expert_offset`` set)
      and the dispatcher becomes an ``AllToAllTokenDispatcher`` over ``ep_group``
      (``apply_moe_overlap`` may then chunk it), or an ``AllGatherTokenDispatcher`` with
      ``dispatcher="allgather"`` (``ParallelConfig.moe_dispatcher``). Both exchange over the ep
      group the tokens this rank dispatches (its 1/tp slice under TP).
    - tp > 1: the MoE gets ``tp_group``: the router sees every token, each tp rank dispatches 1/tp
      of them and the output is all-gathered (see ``longcat.model.moe.layer``).

    Gradient reduction afterwards: expert weights (``expert_param_global_info`` names them) over
    ``edp_group``; the router and all other replicated dense weights over ``dp_group``.

    Raises:
        ValueError: n_routed_experts not divisible by ep, or the model was already parallelised.
    """
    ep, tp = groups.ep_size, groups.tp_size
    kind = MoEDispatcher(dispatcher)
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        N, experts = moe.num_ffn_experts, moe.experts
        if N % ep != 0:
            raise ValueError(f"{name}: n_routed_experts={N} is not divisible by ep={ep}: choose ep dividing {N}")
        if experts.num_local_experts != N or moe.tp_group is not None:
            raise ValueError(
                f"{name}: already parallelised ({experts.num_local_experts} of {N} experts local); apply "
                "apply_expert_parallel once, to a model holding all experts"
            )
        if ep > 1:
            local = N // ep
            experts.narrow_(expert_offset=groups.ep_rank * local, num_local_experts=local)
            moe.dispatcher = (AllGatherTokenDispatcher(N, ep_group=groups.ep_group) if kind is MoEDispatcher.allgather
                              else AllToAllTokenDispatcher(N, ep_group=groups.ep_group))
        if tp > 1:
            moe.tp_group = groups.tp_group


def apply_moe_overlap(
    model: nn.Module, *, overlap: bool, num_chunks: int = 1, chunk_dim: MoEChunkDim | str = MoEChunkDim.expert
) -> None:
    """Set the ScMoE schedule of every decoder layer of ``model`` (in place).

    Args:
        model: a model after ``apply_expert_parallel`` (dispatchers already chosen).
        overlap: ``ParallelConfig.overlap_moe_comm``: the MoE's exchanges run under the dense branch
            (True) or the MoE runs whole before it (False). Same numbers either way.
        num_chunks: ``ParallelConfig.moe_chunks``: split each all-to-all exchange into this many
            pipelined chunks; 1 = no split. MoEs without expert parallelism (nothing to exchange) and
            all-gather dispatchers are left as they are.
        chunk_dim: ``ParallelConfig.moe_chunk_dim``: ``expert`` (``ChunkedAllToAllTokenDispatcher``,
            chunks of local experts) or ``token`` (``TokenChunkedTokenDispatcher``, chunks of tokens).

    Raises:
        ValueError: ``num_chunks`` < 1, or not dividing the local expert count with ``chunk_dim=expert``.
    """
    if num_chunks < 1:
        raise ValueError(f"moe_chunks={num_chunks} must be >= 1")
    dim = MoEChunkDim(chunk_dim)
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.overlap_moe_comm = overlap
        if isinstance(module, MoE) and isinstance(module.dispatcher, (AllToAllTokenDispatcher,
                                                                      TokenChunkedTokenDispatcher)):
            N, ep_group = module.num_ffn_experts, module.dispatcher.ep_group
            kind: type = (AllToAllTokenDispatcher if num_chunks == 1 else
                          ChunkedAllToAllTokenDispatcher if dim is MoEChunkDim.expert else TokenChunkedTokenDispatcher)
            if type(module.dispatcher) is kind and getattr(module.dispatcher, "num_chunks", 1) == num_chunks:
                continue  # already so (its counters are kept)
            module.dispatcher = (AllToAllTokenDispatcher(N, ep_group=ep_group) if num_chunks == 1
                                 else kind(N, ep_group=ep_group, num_chunks=num_chunks))


class ExpertShard(NamedTuple):
    """A local expert weight as a piece of the global one: rows ``[offset, offset + local rows)``
    of a tensor of ``global_shape`` (dim 0 = global expert id)."""

    global_shape: tuple[int, ...]
    offset: int


def expert_param_global_info(model: nn.Module, groups: ProcessGroups) -> dict[str, ExpertShard]:
    """Every expert weight of ``model`` (``named_parameters`` names) -> its place in the global tensor.

    Expert weights are sharded over ep along dim 0 and replicated over edp; every other parameter
    is not listed (dense: replicated over dp). Call on the unwrapped model (names without wrapper
    prefixes). Valid before and after ``apply_expert_parallel`` (offset 0, global = local before).

    Raises:
        ValueError: a MoE's local expert count is neither N nor N / ep.
    """
    info: dict[str, ExpertShard] = {}
    for prefix, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        N, experts = moe.num_ffn_experts, moe.experts
        if experts.num_local_experts not in (N, N // groups.ep_size):
            raise ValueError(
                f"{prefix}: {experts.num_local_experts} local experts of {N} does not match ep={groups.ep_size}"
            )
        for pname in _EXPERT_PARAMS:
            local = getattr(experts, pname)
            name = f"{prefix}.experts.{pname}" if prefix else f"experts.{pname}"
            info[name] = ExpertShard(global_shape=(N,) + tuple(local.shape[1:]), offset=experts.expert_offset)
    return info


def expert_shard_to_dtensor(local: torch.Tensor, shard: ExpertShard, *, groups: ProcessGroups) -> DTensor:
    """Wrap a local expert tensor (a weight, its grad or an optimizer state shaped like it) as a
    ``DTensor`` of ``shard.global_shape`` on the ``("edp", "ep")`` sub-mesh of ``groups.expert_mesh``,
    placements ``[Replicate(), Shard(0)]`` (no communication), e.g. for ``torch.distributed.checkpoint``,
    which then saves one copy of each shard and reshards on load.

    Raises:
        ValueError: ``groups`` has no expert mesh (``ProcessGroups.single()``), or the shard is not the
            even ep split of the global tensor.
    """
    if groups.expert_mesh is None:
        raise ValueError("expert_shard_to_dtensor needs ProcessGroups.build (a device mesh), not single()")
    N = shard.global_shape[0]
    if local.shape[0] * groups.ep_size != N or shard.offset != groups.ep_rank * local.shape[0]:
        raise ValueError(
            f"local rows {local.shape[0]} at offset {shard.offset} are not ep rank {groups.ep_rank}'s even "
            f"share of {N} experts over ep={groups.ep_size}: call apply_expert_parallel first"
        )
    mesh = groups.expert_mesh["edp", "ep"]
    stride = torch.empty(shard.global_shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, [Replicate(), Shard(0)], run_check=False, shape=torch.Size(shard.global_shape), stride=stride
    )
