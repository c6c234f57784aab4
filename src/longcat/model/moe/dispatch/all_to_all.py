"""The expert-parallel token dispatcher: uneven all-to-alls over the ep group.

Layout (docs/architecture.md): the N FFN experts of every MoE are sharded over the ep group
by global id, ep rank r holding ``[r * N/ep, (r + 1) * N/ep)``. Zero experts are never sent: only
FFN-expert assignments enter the all-to-all.

One dispatch, on every rank of the ep group (Megatron-core ``MoEAlltoAllTokenDispatcher``):

    [T, D] tokens ─ permute by global expert id (FFN slots only) ─> [S, D], S = sum(counts_N)
    counts_N [N] ─ exchange_counts(ep) ─> received_GL [G, L], input/output splits (one host sync)
    [S, D] by destination rank ─ all_to_all_uneven(ep) ─> [R, D] by source rank, then local expert
    [R, D] ─ sort by local expert (a permutation) ─> [R, D] for the grouped GEMM, counts_L [L]

and combine is the reverse: unsort -> all-to-all back -> gate x row on the token's rank -> slot sum.

Shape legend:
    G  ep group size
    N  FFN experts in total; L = N / G local experts per rank
    T  tokens on this rank (its tp slice under TP); K moe_topk; D hidden_size
    S  rows this rank sends (its FFN-expert slots); R rows it receives for its L experts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longcat.distributed.collectives import (
    AllToAllHandle,
    ExchangedCounts,
    all_to_all_uneven,
    exchange_counts,
)
from longcat.model.moe.dispatch.base import (
    DispatchCounters,
    DispatchedTokens,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.dispatch.permute import (
    SourcePermutation,
    count_by_expert,
    local_expert_order,
    permute_rows,
    permute_tokens,
    source_permutation,
    weight_and_unpermute,
)

__all__ = ["AllToAllTokenDispatcher", "RowCounter", "peer_bytes", "wait_rows"]


class RowCounter:
    """Accumulates a dispatcher's ``DispatchCounters`` (zero-expert rows as a device tensor: no host
    sync per dispatch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.dispatched_rows = 0
        self.received_rows = 0
        self.num_dispatches = 0
        self.peer_bytes_sent = 0
        self.zero_rows_sent: torch.Tensor | int = 0

    def record(
        self, *, num_sent: int, num_received: int, sent_expert_ids_S: torch.Tensor, num_experts: int,
        peer_bytes: int = 0,
    ) -> None:
        """One dispatch: rows sent and received (host ints), the expert id of every row sent (a row
        counts as a zero-expert row when its id is >= ``num_experts``) and the bytes this rank sends to
        its peers in the dispatch and the combine."""
        self.dispatched_rows += num_sent
        self.received_rows += num_received
        self.num_dispatches += 1
        self.peer_bytes_sent += peer_bytes
        self.zero_rows_sent = self.zero_rows_sent + (sent_expert_ids_S >= num_experts).sum()

    def snapshot(self) -> DispatchCounters:
        """The counters so far (reads one device scalar: a host sync)."""
        return DispatchCounters(
            dispatched_rows=self.dispatched_rows,
            received_rows=self.received_rows,
            zero_expert_rows_sent=int(self.zero_rows_sent),
            num_dispatches=self.num_dispatches,
            peer_bytes_sent=self.peer_bytes_sent,
        )


def peer_bytes(exchanged: ExchangedCounts, tokens_TD: torch.Tensor, *, group: dist.ProcessGroup) -> int:
    """Bytes of token rows this rank sends to its peers in one dispatch and its combine: the rows it
    sends to other ranks plus the rows it received from them (returned in the combine)."""
    me = group.rank()
    rows = sum(exchanged.input_splits) - exchanged.input_splits[me]
    rows += sum(exchanged.output_splits) - exchanged.output_splits[me]
    return rows * tokens_TD.shape[1] * tokens_TD.element_size()


def wait_rows(rows: AllToAllHandle | torch.Tensor) -> torch.Tensor:
    """The rows of an exchange: wait for it if it is still in flight."""
    return rows.wait() if isinstance(rows, AllToAllHandle) else rows


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
        self.row_counter = RowCounter()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        self.row_counter.reset()

    def counters(self) -> DispatchCounters:
        """The counters so far (reads one device scalar: a host sync)."""
        return self.row_counter.snapshot()

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
        self.row_counter.record(num_sent=num_sent, num_received=sum(exchanged.output_splits),
                                sent_expert_ids_S=perm.sent_expert_ids_S, num_experts=N,
                                peer_bytes=peer_bytes(exchanged, tokens_TD, group=self.ep_group))

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
        rows_RD = wait_rows(pending.rows)
        received_GL = pending.exchanged.received_GE
        sort_R = unsort_R = None
        if received_GL.shape[0] > 1 and received_GL.shape[1] > 1:
            sort_R, unsort_R = local_expert_order(received_GL, rows_RD.shape[0])
            rows_RD = permute_rows(rows_RD, perm_R=sort_R, inverse_R=unsort_R)
        handle = _EPHandle(pending.exchanged, pending.perm, sort_R, unsort_R, pending.out_dtype)
        return DispatchedTokens(tokens_RD=rows_RD, counts_L=received_GL.sum(dim=0), handle=handle)

    # ------------------------------------------------------------------ combine
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: _EPHandle) -> PendingCombine:
        rows_RD = expert_out_RD
        if handle.sort_R is not None:
            assert handle.unsort_R is not None  # set together with sort_R
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
        rows_SD = wait_rows(pending.rows)
        handle: _EPHandle = pending.handle
        perm = handle.perm
        return weight_and_unpermute(rows_SD, gates_S=perm.gates_S, handle=perm.handle, out_dtype=handle.out_dtype)
