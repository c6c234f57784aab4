"""The token-dispatcher interface: routed token copies -> grouped by local expert -> back.

Only FFN-expert assignments (global id < N) pass through a dispatcher; zero-expert outputs are
formed locally by the MoE layer. Each direction is split in two so that the ScMoE layer can run
dense work while an exchange is in flight:

    dispatch_start -> (dense work) -> run_experts (dispatch_wait -> grouped GEMM -> combine_start)
                   -> (dense work) -> combine_wait

``dispatch`` and ``combine`` are the synchronous paths (start, then wait at once). Overlap on or off
gives the same bits. A dispatcher that splits its rows into chunks overrides ``run_experts`` to
pipeline them (``chunked``).

The gates are applied in ``combine_wait``, on the rank that owns the token (after the return
exchange under expert parallelism), so they never travel; the experts return un-weighted rows.

Shape legend:
    T  tokens (local)
    K  moe_topk (slots per token)
    D  hidden_size
    L  local FFN experts
    R  routed rows for the local experts (sum of counts_L)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["DispatchCounters", "DispatchedTokens", "PendingCombine", "TokenDispatcher"]


@dataclass
class DispatchedTokens:
    """tokens_RD: routed copies sorted by local expert id (token order within an expert on one
    source rank; source rank order across ranks). counts_L: int64 rows per local expert (sum = R).
    handle: the dispatcher's own state, handed back to ``combine`` / ``combine_start``."""

    tokens_RD: torch.Tensor
    counts_L: torch.Tensor
    handle: Any  # opaque: each dispatcher's own type


@dataclass
class PendingCombine:
    """A combine in flight (from ``combine_start``); pass it to ``combine_wait``."""

    rows: Any  # opaque: rows, or exchanges in flight, of the dispatcher that made it
    handle: Any


@dataclass(frozen=True)
class DispatchCounters:
    """Cumulative rows through one exchanging dispatcher (this rank), since the last reset.

    dispatched_rows: token copies this rank put into the dispatch exchange (sum of S).
    received_rows: token copies it received for its local experts (sum of R).
    zero_expert_rows_sent: rows of the send buffers whose expert id is a zero expert (>= N); must
        stay 0 (zero experts are formed on the token's own rank).
    num_dispatches: dispatch calls (an activation-checkpointed layer counts twice: its forward is
        recomputed in backward).
    peer_bytes_sent: bytes this rank sent to the other ranks of the ep group in the forward's
        dispatch and combine exchanges together (rows, and the all-gather dispatcher's ids and gates;
        not the count exchanges). The backward sends the same again.
    """

    dispatched_rows: int
    received_rows: int
    zero_expert_rows_sent: int
    num_dispatches: int
    peer_bytes_sent: int = 0


class TokenDispatcher(abc.ABC):
    """Moves token copies to their experts and the expert outputs back (gate-weighted at home).

    Implementations: ``LocalTokenDispatcher`` (one process, all experts local),
    ``AllToAllTokenDispatcher`` (expert parallelism), ``ChunkedAllToAllTokenDispatcher`` (its
    exchange in pipelined chunks of local experts), ``TokenChunkedTokenDispatcher`` (of tokens),
    ``AllGatherTokenDispatcher`` (all-gather / reduce-scatter). A new one is a subclass in its own
    module of this package.
    """

    @abc.abstractmethod
    def dispatch_start(self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> Any:
        """Permute the FFN-expert copies of tokens_TD [T, D] and start sending them; returns a pending
        handle for ``dispatch_wait``. expert_ids_TK: int64 global ids [T, K] (ids >= N, zero experts,
        are dropped here); gates_TK: fp32 [T, K] with grad, kept on this rank for ``combine``."""

    @abc.abstractmethod
    def dispatch_wait(self, pending: Any) -> DispatchedTokens:
        """Wait for the dispatch and return the rows for the local experts, sorted by local expert."""

    @abc.abstractmethod
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: Any) -> PendingCombine:
        """Start sending the local experts' (un-weighted) outputs [R, D] back to their tokens' ranks."""

    @abc.abstractmethod
    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        """Wait for the combine; returns [T, D] in the tokens' dtype: per token, the gate-weighted sum
        over its FFN slots (gate x row in fp32, then cast); tokens without FFN experts get zeros."""

    def run_experts(self, pending: Any, *, experts: Callable[..., torch.Tensor]) -> PendingCombine:
        """Wait for the dispatch, run ``experts(tokens_RD, counts_L=counts_L)`` (-> [R, D]) on the rows
        received and start the combine; returns the combine in flight for ``combine_wait``."""
        dispatched = self.dispatch_wait(pending)
        expert_out_RD = experts(dispatched.tokens_RD, counts_L=dispatched.counts_L)
        return self.combine_start(expert_out_RD, handle=dispatched.handle)

    def dispatch(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> DispatchedTokens:
        """Synchronous ``dispatch_start`` + ``dispatch_wait``."""
        return self.dispatch_wait(self.dispatch_start(tokens_TD, expert_ids_TK=expert_ids_TK, gates_TK=gates_TK))

    def combine(self, expert_out_RD: torch.Tensor, *, handle: Any) -> torch.Tensor:
        """Synchronous ``combine_start`` + ``combine_wait``."""
        return self.combine_wait(self.combine_start(expert_out_RD, handle=handle))
