"""The single-process token dispatcher: every FFN expert is local, nothing is exchanged.

    [T, D] tokens ─ permute by global expert id (FFN slots only) ─> [R, D] for the grouped GEMM
    [R, D] expert outputs ─ gate x row, slot sum ─> [T, D]

Shape legend:
    T  tokens; K moe_topk; D hidden_size; N FFN experts (all local)
    R  routed rows (this process's FFN-expert slots)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat.model.moe.dispatch.base import (
    DispatchedTokens,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.dispatch.permute import (
    SourcePermutation,
    permute_tokens,
    source_permutation,
    weight_and_unpermute,
)

__all__ = ["LocalTokenDispatcher"]


@dataclass
class _LocalState:
    perm: SourcePermutation
    out_dtype: torch.dtype


class LocalTokenDispatcher(TokenDispatcher):
    """Single process: every FFN expert is local (L = N, expert_offset 0); no communication.

    Args:
        num_experts: N, the FFN experts; ids >= N are zero experts and are not dispatched.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch_start(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> DispatchedTokens:
        perm = source_permutation(expert_ids_TK, gates_TK, num_experts=self.num_experts)
        tokens_RD = permute_tokens(tokens_TD, handle=perm.handle)
        return DispatchedTokens(tokens_RD=tokens_RD, counts_L=perm.counts_N, handle=_LocalState(perm, tokens_TD.dtype))

    def dispatch_wait(self, pending: DispatchedTokens) -> DispatchedTokens:
        return pending

    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: _LocalState) -> PendingCombine:
        return PendingCombine(rows=expert_out_RD, handle=handle)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        state: _LocalState = pending.handle
        perm = state.perm
        return weight_and_unpermute(pending.rows, gates_S=perm.gates_S, handle=perm.handle, out_dtype=state.out_dtype)
