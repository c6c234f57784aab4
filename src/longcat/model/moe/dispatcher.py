"""Token dispatcher: routed token copies -> grouped by local expert -> back (PAPER.md §2.1, §5.3).

Only FFN-expert assignments (global id < N) pass through a dispatcher; zero-expert outputs are
formed locally by the MoE layer. ``LocalTokenDispatcher`` is the single-process case (all N
experts local); ``longcat.distributed.expert_parallel.AllToAllTokenDispatcher`` adds an
all-to-all over the ep group between the permute and the experts (and its inverse in combine).

Each direction is split in two so that the ScMoE layer can run dense work while the exchange is
in flight: ``dispatch_start`` -> (dense work) -> ``run_experts`` (``dispatch_wait`` -> grouped GEMM
-> ``combine_start``) -> (dense work) -> ``combine_wait``. ``dispatch`` and ``combine`` are the
synchronous paths (start, then wait at once). Overlap on or off gives the same bits. A dispatcher
that splits its rows into chunks (``longcat.model.moe.chunked``) overrides ``run_experts`` to
pipeline them.

The gates are applied in ``combine``, on the rank that owns the token (after the return
all-to-all under expert parallelism), so they never travel; the experts return un-weighted rows.

Both directions are deterministic: the permute's backward and the combine are an ``index_copy``
into a [T*K, D] slot buffer (each slot written once) followed by a sum over K, never an
accumulating scatter over duplicate token indices.

Shape legend:
    T  tokens (local)
    K  moe_topk (slots per token)
    D  hidden_size
    N  FFN experts in total (global ids 0..N-1; ids >= N are zero experts)
    L  local FFN experts
    S  routed rows sent by this rank: its token copies assigned to FFN experts, sorted by global
       expert id (= by destination rank, then local expert)
    R  routed rows for the local experts (sum of counts_L); R = S without expert parallelism
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class DispatchHandle:
    """How this rank's token copies were permuted (what ``permute_tokens`` / ``unpermute_tokens`` need).

    slot_R: int64 flat slot index t*K + k of each routed row, in send order (sorted by global expert
    id, stable in token order); token_R = slot_R // K. (R here counts this rank's own routed rows,
    the S of the legend under expert parallelism.)"""

    slot_R: torch.Tensor
    token_R: torch.Tensor
    num_tokens: int
    top_k: int


@dataclass
class DispatchedTokens:
    """tokens_RD: routed copies sorted by local expert id (token order within an expert on one
    source rank; source rank order across ranks). counts_L: int64 rows per local expert (sum = R).
    handle: opaque, handed back to ``combine`` / ``combine_start``."""

    tokens_RD: torch.Tensor
    counts_L: torch.Tensor
    handle: Any


@dataclass
class PendingCombine:
    """A combine in flight (from ``combine_start``); pass it to ``combine_wait``."""

    rows: Any
    handle: Any


class TokenDispatcher(abc.ABC):
    """Moves token copies to their experts and the expert outputs back (gate-weighted at home)."""

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


@dataclass
class SourcePermutation:
    """The sender side of a dispatch: which slots leave, how many per global FFN expert, their gates.

    handle: the permutation of the S routed rows (send order). counts_N: int64 [N] rows per global
    FFN expert (device tensor). gates_S: fp32 [S] gates of the rows, with grad. sent_expert_ids_S:
    int64 [S] the expert id of every row in send order (for counting, never sent)."""

    handle: DispatchHandle
    counts_N: torch.Tensor
    gates_S: torch.Tensor
    sent_expert_ids_S: torch.Tensor


def count_by_expert(expert_ids_TK: torch.Tensor, *, num_experts: int) -> torch.Tensor:
    """int64 [N]: slots assigned to each global FFN expert (zero-expert ids >= N are not counted)."""
    key_TxK = expert_ids_TK.reshape(-1).clamp(max=num_experts)
    return torch.bincount(key_TxK, minlength=num_experts + 1)[:num_experts]


def _send_order_key(expert_ids_TK: torch.Tensor, *, num_experts: int, chunk_size: int, chunk_span: int) -> torch.Tensor:
    """int64 [T*K] sort key of each slot: chunk-major, then global expert id; zero experts last."""
    ids_TxK = expert_ids_TK.reshape(-1)
    if chunk_span == chunk_size:  # one chunk: the key is the expert id
        return ids_TxK.clamp(max=num_experts)
    N = num_experts
    chunk_TxK = torch.div(ids_TxK % chunk_span, chunk_size, rounding_mode="floor")
    num_chunks = chunk_span // chunk_size
    return torch.where(ids_TxK < N, chunk_TxK * N + ids_TxK, num_chunks * N)


def source_permutation(
    expert_ids_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    *,
    num_experts: int,
    counts_N: torch.Tensor | None = None,
    num_routed: int | None = None,
    num_local_experts: int | None = None,
    num_chunks: int = 1,
) -> SourcePermutation:
    """Sort this rank's FFN-expert slots by global expert id (stable, so token order within an expert).

    Zero-expert slots (ids >= ``num_experts``) sort after every FFN slot and are cut off, so they are
    never permuted, sent or computed. ``counts_N`` (``count_by_expert``) and ``num_routed`` (S = its
    sum, on the host) may be passed when the caller has them; otherwise S is read from the counts
    (one host sync: the grouped GEMM and the all-to-all splits need it anyway).

    With ``num_chunks`` > 1 the local experts of every rank (``num_local_experts`` L of them, L a
    multiple of ``num_chunks``) are cut into ``num_chunks`` consecutive groups, and the order is
    chunk-major: first every slot of chunk 0 (local experts ``[0, L/C)`` of each rank) by global id,
    then chunk 1, ... (``longcat.model.moe.chunked``). Each expert's slots stay in token order.
    """
    T, K = expert_ids_TK.shape
    N = num_experts
    L = N if num_local_experts is None else num_local_experts
    if num_chunks < 1 or L % num_chunks or N % L:
        raise ValueError(
            f"num_chunks={num_chunks} must be >= 1 and divide num_local_experts={L}, which must divide "
            f"num_experts={N}"
        )
    key_TxK = _send_order_key(expert_ids_TK, num_experts=N, chunk_size=L // num_chunks, chunk_span=L)
    order_TxK = torch.argsort(key_TxK, stable=True)
    if counts_N is None:
        counts_N = count_by_expert(expert_ids_TK, num_experts=N)
    if num_routed is None:
        num_routed = int(counts_N.sum())
    slot_S = order_TxK[:num_routed]
    token_S = torch.div(slot_S, K, rounding_mode="floor")
    return SourcePermutation(
        handle=DispatchHandle(slot_R=slot_S, token_R=token_S, num_tokens=T, top_k=K),
        counts_N=counts_N,
        gates_S=gates_TK.reshape(-1).index_select(0, slot_S),
        sent_expert_ids_S=expert_ids_TK.reshape(-1).index_select(0, slot_S),
    )


def weight_and_unpermute(
    rows_SD: torch.Tensor, *, gates_S: torch.Tensor, handle: DispatchHandle, out_dtype: torch.dtype
) -> torch.Tensor:
    """Back home: gate x row (fp32 gates, so an fp32 product), cast to ``out_dtype``, then the slot
    sum -> [T, D]."""
    weighted_SD = (rows_SD * gates_S[:, None]).to(out_dtype)
    return unpermute_tokens(weighted_SD, handle=handle)


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

    def dispatch_start(self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> Any:
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


class _PermuteRows(torch.autograd.Function):
    """rows [R, D] -> rows[perm]; backward: the inverse permutation (a gather, no scatter-add)."""

    @staticmethod
    def forward(ctx, rows_RD: torch.Tensor, perm_R: torch.Tensor, inverse_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_R)
        return rows_RD.index_select(0, perm_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None, None


def permute_tokens(tokens_TD: torch.Tensor, *, handle: DispatchHandle) -> torch.Tensor:
    """Copies of the routed tokens in dispatch order, [R, D]."""
    return _PermuteTokens.apply(tokens_TD, handle)


def unpermute_tokens(rows_RD: torch.Tensor, *, handle: DispatchHandle) -> torch.Tensor:
    """Inverse of ``permute_tokens`` summed over each token's slots, [T, D]."""
    return _UnpermuteTokens.apply(rows_RD, handle)


def permute_rows(rows_RD: torch.Tensor, *, perm_R: torch.Tensor, inverse_R: torch.Tensor) -> torch.Tensor:
    """``rows_RD[perm_R]`` for a permutation ``perm_R`` (int64 [R]) with ``inverse_R[perm_R] = arange(R)``;
    the backward gathers with ``inverse_R``, so it is deterministic (no accumulating scatter)."""
    return _PermuteRows.apply(rows_RD, perm_R, inverse_R)
