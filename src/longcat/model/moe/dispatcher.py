"""Token dispatcher: routed token copies -> grouped by local expert -> back (PAPER.md §2.1, §5.3).

Only FFN-expert assignments (global id < N) pass through a dispatcher; zero-expert outputs are
formed locally by the MoE layer. ``LocalTokenDispatcher`` is the single-process case (all N
experts local). An expert-parallel dispatcher implements the same two methods and adds an
all-to-all between the permute and the experts (and its inverse in ``combine``).

Both directions are deterministic: the permute's backward and the combine are an ``index_copy``
into a [T*K, D] slot buffer (each slot written once) followed by a sum over K, never an
accumulating scatter over duplicate token indices.

Shape legend:
    T  tokens (local)
    K  moe_topk (slots per token)
    D  hidden_size
    L  local FFN experts
    R  routed rows: token copies assigned to the local experts (sum of counts_L)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass
class DispatchHandle:
    """What ``combine`` needs to undo a dispatch. slot_R: flat slot index t*K + k of each routed row;
    token_R: slot_R // K."""

    slot_R: torch.Tensor
    token_R: torch.Tensor
    num_tokens: int
    top_k: int


@dataclass
class DispatchedTokens:
    """tokens_RD: routed copies sorted by local expert id (stable: token order within an expert).
    gates_R: their fp32 gates (with grad). counts_L: int64 rows per local expert (sum = R).
    handle: opaque, handed back to ``combine``."""

    tokens_RD: torch.Tensor
    gates_R: torch.Tensor
    counts_L: torch.Tensor
    handle: Any


class TokenDispatcher(abc.ABC):
    """Moves token copies to their experts and the (gate-weighted) expert outputs back."""

    @abc.abstractmethod
    def dispatch(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> DispatchedTokens:
        """Global ids >= num FFN experts (zero experts) are dropped here."""

    @abc.abstractmethod
    def combine(self, expert_out_RD: torch.Tensor, *, handle: Any) -> torch.Tensor:
        """[R, D] outputs (already gate-weighted) -> [T, D]: per token, the sum over its FFN slots;
        tokens without FFN experts get zeros."""


class LocalTokenDispatcher(TokenDispatcher):
    """Single process: every FFN expert is local (L = N, expert_offset 0).

    Args:
        num_experts: N, the FFN experts; ids >= N are zero experts and are not dispatched.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> DispatchedTokens:
        T, K = expert_ids_TK.shape
        N = self.num_experts
        # Zero-expert slots share the sentinel key N and so sort after every FFN slot.
        key_TxK = expert_ids_TK.reshape(-1).clamp(max=N)
        order_TxK = torch.argsort(key_TxK, stable=True)
        counts_L = torch.bincount(key_TxK, minlength=N + 1)[:N]
        # Host sync: the grouped GEMM (and, under EP, the all-to-all splits) need R on the host.
        num_routed = int(counts_L.sum())
        slot_R = order_TxK[:num_routed]
        token_R = torch.div(slot_R, K, rounding_mode="floor")
        handle = DispatchHandle(slot_R=slot_R, token_R=token_R, num_tokens=T, top_k=K)
        return DispatchedTokens(
            tokens_RD=permute_tokens(tokens_TD, handle=handle),
            gates_R=gates_TK.reshape(-1).index_select(0, slot_R),
            counts_L=counts_L,
            handle=handle,
        )

    def combine(self, expert_out_RD: torch.Tensor, *, handle: DispatchHandle) -> torch.Tensor:
        return unpermute_tokens(expert_out_RD, handle=handle)


def _sum_slots(rows_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """[R, D] -> [T, D]: write each row to its slot (unique), then sum the K slots of each token."""
    T, K = handle.num_tokens, handle.top_k
    slots_TxKD = rows_RD.new_zeros(T * K, rows_RD.shape[-1])
    slots_TxKD.index_copy_(0, handle.slot_R, rows_RD)
    return slots_TxKD.view(T, K, -1).sum(dim=1)


class _PermuteTokens(torch.autograd.Function):
    """tokens_TD [T, D] -> [R, D] gather; backward: deterministic slot sum."""

    @staticmethod
    def forward(ctx, tokens_TD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        ctx.handle = handle
        return tokens_TD.index_select(0, handle.token_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        return _sum_slots(grad_RD, ctx.handle), None


class _UnpermuteTokens(torch.autograd.Function):
    """rows_RD [R, D] -> [T, D] slot sum; backward: gather."""

    @staticmethod
    def forward(ctx, rows_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        ctx.handle = handle
        return _sum_slots(rows_RD, handle)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        return grad_TD.index_select(0, ctx.handle.token_R), None


def permute_tokens(tokens_TD: torch.Tensor, *, handle: DispatchHandle) -> torch.Tensor:
    """Copies of the routed tokens in dispatch order, [R, D]."""
    return _PermuteTokens.apply(tokens_TD, handle)


def unpermute_tokens(rows_RD: torch.Tensor, *, handle: DispatchHandle) -> torch.Tensor:
    """Inverse of ``permute_tokens`` summed over each token's slots, [T, D]."""
    return _UnpermuteTokens.apply(rows_RD, handle)
