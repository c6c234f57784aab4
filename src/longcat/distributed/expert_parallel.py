"""Expert parallelism: the all-to-all token dispatcher and the in-place EP (and MoE-under-TP) plan.

Layout (DESIGN.md "Parallel layout"): the N FFN experts of every MoE are sharded over the ep group
by global id, ep rank r holding ``[r * N/ep, (r + 1) * N/ep)``, and replicated over edp. Zero
experts are never sharded or sent: only FFN-expert assignments enter the all-to-all.

One dispatch, on every rank of the ep group (Megatron-core ``MoEAlltoAllTokenDispatcher``):

    [T, D] tokens ─ permute by global expert id (FFN slots only) ─> [S, D], S = sum(counts_N)
    counts_N [N] ─ exchange_counts(ep) ─> received_GL [G, L], input/output splits (one host sync)
    [S, D] by destination rank ─ all_to_all_uneven(ep) ─> [R, D] by source rank, then local expert
    [R, D] ─ sort by local expert (a permutation) ─> [R, D] for the grouped GEMM, counts_L [L]

and combine is the reverse: unsort -> all-to-all back -> gate x row on the token's rank -> slot sum.

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
    G  ep group size
    N  FFN experts in total; L = N / G local experts per rank
    T  tokens on this rank (its tp slice under TP); K moe_topk; D hidden_size
    S  rows this rank sends (its FFN-expert slots); R rows it receives for its L experts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from longcat.distributed.collectives import AllToAllHandle, ExchangedCounts, all_to_all_uneven, exchange_counts
from longcat.distributed.groups import ProcessGroups
from longcat.model.moe.dispatcher import (
    DispatchedTokens,
    PendingCombine,
    SourcePermutation,
    TokenDispatcher,
    count_by_expert,
    permute_rows,
    permute_tokens,
    source_permutation,
    weight_and_unpermute,
)
from longcat.model.moe.layer import MoE

__all__ = [
    "AllToAllTokenDispatcher",
    "DispatchCounters",
    "ExpertShard",
    "apply_expert_parallel",
    "expert_param_global_info",
    "expert_shard_to_dtensor",
]

_EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DispatchCounters:
    """Cumulative rows through one ``AllToAllTokenDispatcher`` (this rank), since the last reset.

    dispatched_rows: token copies this rank put into the dispatch all-to-all (sum of S).
    received_rows: token copies it received for its local experts (sum of R).
    zero_expert_rows_sent: rows of the send buffers whose expert id is a zero expert (>= N); must
        stay 0 (zero experts are formed on the token's own rank).
    num_dispatches: dispatch calls (an activation-checkpointed layer counts twice: its forward is
        recomputed in backward).
    """

    dispatched_rows: int
    received_rows: int
    zero_expert_rows_sent: int
    num_dispatches: int


@dataclass
class _PendingDispatch:
    rows: AllToAllHandle | torch.Tensor
    exchanged: ExchangedCounts
    perm: SourcePermutation
    out_dtype: torch.dtype


@dataclass
class _EPHandle:
    """What combine needs: the splits, the receiver-side sort and the sender-side permutation."""

    exchanged: ExchangedCounts
    perm: SourcePermutation
    sort_R: torch.Tensor | None  # None: rows already arrive in local-expert order
    unsort_R: torch.Tensor | None
    out_dtype: torch.dtype


def _local_expert_order(received_GL: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation taking rows grouped (source g, local expert l) to (l, g), and its inverse.

    Rows arrive as chunks (g, l) of ``received_GL[g, l]`` rows in row-major order; the grouped GEMM
    needs all of expert l's rows together. Returns (sort_R, unsort_R), int64 [R].
    """
    G, L = received_GL.shape
    sizes_GxL = received_GL.reshape(-1)
    starts_GL = (torch.cumsum(sizes_GxL, 0) - sizes_GxL).view(G, L)
    sizes_LxG = received_GL.t().reshape(-1)
    new_starts_LxG = torch.cumsum(sizes_LxG, 0) - sizes_LxG
    arange_R = torch.arange(num_rows, device=received_GL.device)
    within_R = arange_R - torch.repeat_interleave(new_starts_LxG, sizes_LxG, output_size=num_rows)
    sort_R = torch.repeat_interleave(starts_GL.t().reshape(-1), sizes_LxG, output_size=num_rows) + within_R
    unsort_R = torch.empty_like(sort_R)
    unsort_R[sort_R] = arange_R  # a permutation: every index written once
    return sort_R, unsort_R


class AllToAllTokenDispatcher(TokenDispatcher):
    """Dispatch over the ep group with uneven all-to-alls; this rank runs experts
    ``[ep_rank * L, (ep_rank + 1) * L)``, L = N / ep.

    ``dispatch_start`` exchanges the counts (one host sync), permutes and launches the all-to-all
    asynchronously; ``dispatch_wait`` waits and sorts by local expert. ``combine_start`` launches
    the return all-to-all; ``combine_wait`` waits, applies the gates and sums each token's slots.
    Every rank of the ep group must make the same sequence of calls (each is a collective), also
    with nothing to send or receive, and must backpropagate through the result.

    Args:
        num_experts: N, the FFN experts in total (ids >= N are zero experts: never sent).
        ep_group: the ep group (``ProcessGroups.ep_group``).

    Raises:
        ValueError: N not divisible by the ep group size.
    """

    def __init__(self, num_experts: int, *, ep_group: dist.ProcessGroup) -> None:
        size = ep_group.size()
        if num_experts % size != 0:
            raise ValueError(
                f"n_routed_experts={num_experts} is not divisible by the ep group size {size}: choose ep dividing "
                f"{num_experts}"
            )
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.num_local_experts = num_experts // size
        self.expert_offset = ep_group.rank() * self.num_local_experts
        self.reset_counters()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        self._dispatched_rows = 0
        self._received_rows = 0
        self._num_dispatches = 0
        self._zero_rows_sent: torch.Tensor | int = 0  # a device tensor: no host sync per dispatch

    def counters(self) -> DispatchCounters:
        """The counters so far (reads one device scalar: a host sync)."""
        return DispatchCounters(
            dispatched_rows=self._dispatched_rows,
            received_rows=self._received_rows,
            zero_expert_rows_sent=int(self._zero_rows_sent),
            num_dispatches=self._num_dispatches,
        )

    # ------------------------------------------------------------------ dispatch
    def dispatch_start(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> _PendingDispatch:
        N = self.num_experts
        counts_N = count_by_expert(expert_ids_TK, num_experts=N)
        # [N] rows per global expert -> all_to_all(ep) -> [G, L] rows per (source, local expert)
        exchanged = exchange_counts(counts_N, group=self.ep_group)
        num_sent = sum(exchanged.input_splits)
        perm = source_permutation(expert_ids_TK, gates_TK, num_experts=N, counts_N=counts_N, num_routed=num_sent)
        tokens_SD = permute_tokens(tokens_TD, handle=perm.handle)

        self._dispatched_rows += num_sent
        self._received_rows += sum(exchanged.output_splits)
        self._num_dispatches += 1
        self._zero_rows_sent = self._zero_rows_sent + (perm.sent_expert_ids_S >= N).sum()

        # [S, D] rows by destination rank -> all_to_all(ep, async) -> [R, D] rows by source, local expert
        rows = all_to_all_uneven(
            tokens_SD,
            input_splits=exchanged.input_splits,
            output_splits=exchanged.output_splits,
            group=self.ep_group,
            async_op=True,
        )
        return _PendingDispatch(rows=rows, exchanged=exchanged, perm=perm, out_dtype=tokens_TD.dtype)

    def dispatch_wait(self, pending: _PendingDispatch) -> DispatchedTokens:
        rows_RD = pending.rows.wait() if isinstance(pending.rows, AllToAllHandle) else pending.rows
        received_GL = pending.exchanged.received_GE
        sort_R = unsort_R = None
        if received_GL.shape[0] > 1 and received_GL.shape[1] > 1:
            sort_R, unsort_R = _local_expert_order(received_GL, rows_RD.shape[0])
            rows_RD = permute_rows(rows_RD, perm_R=sort_R, inverse_R=unsort_R)
        handle = _EPHandle(pending.exchanged, pending.perm, sort_R, unsort_R, pending.out_dtype)
        return DispatchedTokens(tokens_RD=rows_RD, counts_L=received_GL.sum(dim=0), handle=handle)

    # ------------------------------------------------------------------ combine
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: _EPHandle) -> PendingCombine:
        rows_RD = expert_out_RD
        if handle.sort_R is not None:
            rows_RD = permute_rows(rows_RD, perm_R=handle.unsort_R, inverse_R=handle.sort_R)
        # [R, D] rows by source rank -> all_to_all(ep, splits swapped, async) -> [S, D] in send order
        rows = all_to_all_uneven(
            rows_RD,
            input_splits=handle.exchanged.output_splits,
            output_splits=handle.exchanged.input_splits,
            group=self.ep_group,
            async_op=True,
        )
        return PendingCombine(rows=rows, handle=handle)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        rows_SD = pending.rows.wait() if isinstance(pending.rows, AllToAllHandle) else pending.rows
        handle: _EPHandle = pending.handle
        perm = handle.perm
        return weight_and_unpermute(rows_SD, gates_S=perm.gates_S, handle=perm.handle, out_dtype=handle.out_dtype)


# ---------------------------------------------------------------------------------- the plan


def apply_expert_parallel(model: nn.Module, *, groups: ProcessGroups) -> None:
    """Shard every MoE's experts over ``groups.ep_group`` and split its tokens over ``groups.tp_group``
    (in place). Call once, after the model holds its full weights (identical on every rank) or on
    the meta device, and before building the optimizer (expert parameters are replaced).

    Per MoE (``longcat.model.moe.MoE``):
    - ep > 1: ``experts`` keeps rows ``[ep_rank * N/ep, (ep_rank + 1) * N/ep)`` of each weight
      (names unchanged: ``...mlp.experts.gate_proj`` now ``[N/ep, I, D]``; ``expert_offset`` set)
      and the dispatcher becomes an ``AllToAllTokenDispatcher`` over ``ep_group``.
    - tp > 1: the MoE gets ``tp_group``: the router sees every token, each tp rank dispatches 1/tp
      of them and the output is all-gathered (see ``longcat.model.moe.layer``).

    Gradient reduction afterwards: expert weights (``expert_param_global_info`` names them) over
    ``edp_group``; the router and all other replicated dense weights over ``dp_group``.

    Raises:
        ValueError: n_routed_experts not divisible by ep, or the model was already parallelised.
    """
    ep, tp = groups.ep_size, groups.tp_size
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
            moe.dispatcher = AllToAllTokenDispatcher(N, ep_group=groups.ep_group)
        if tp > 1:
            moe.tp_group = groups.tp_group


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
