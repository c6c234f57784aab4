"""ScMoE with chunks split by token: the paper's split of the expert-parallel exchange (arXiv
2509.01322 §5.3, "ScMoE with chunk").

``TokenChunkedTokenDispatcher`` cuts the T tokens a rank dispatches into ``num_chunks`` consecutive
parts and runs one all-to-all dispatch (``AllToAllTokenDispatcher``) per part:

    dispatch chunk 0, chunk 1 launched  (under FFN0 + MLA1)
    wait 0 -> GEMM 0 -> combine 0 launched;  wait 1 -> GEMM 1 (under combine 0) -> combine 1 launched
    wait combines (under FFN1) -> each chunk's tokens get their gate-weighted slot sums -> concatenated

so chunk 1's dispatch is in flight under chunk 0's expert GEMM, its GEMM under chunk 0's combine,
and both chunks under the dense branch (in backward too: each exchange is an issue and a wait node).

Numbers. A token's output is its own K slots, gate-weighted and summed in slot order as without
chunks, and every expert row meets the same weights; but each chunk's grouped GEMM has fewer rows
than the unchunked one, and GEMM kernels choose their blocking by the row count (on CPU a row of
``x[:3] @ W`` already differs in the last bit from the same row of ``x @ W``), and an expert's weight
gradient is summed per chunk and then added. So token chunks agree with the unchunked layer to
rounding (about 1e-7 relative per layer in fp32; losses and grad norms to 1e-5 after 3 training
steps, ``tests/distributed/test_dispatchers.py``), not bit for bit; overlap on or off and activation
recomputation still give the same bits. Where bit-identity with ``moe_chunks=1`` matters, split by
expert (``ChunkedAllToAllTokenDispatcher``: every expert keeps all its rows, in order, in one GEMM).

Layout of one dispatch with C chunks (G ep ranks, L local experts):

    [T, D] ─ split by token position ─> [T_0, D] | [T_1, D] | ...   T_c = T // C (+1 for c < T % C)
    [T_c, D] ─ AllToAllTokenDispatcher.dispatch_start (counts exchange, permute, all_to_all(ep, async))
    [R_c, D] by local expert ─ grouped GEMM over all L experts ─> combine_start (all_to_all(ep, async))
    combine_wait per chunk -> [T_c, D] ─ cat ─> [T, D]

Shape legend:
    G  ep group size; N FFN experts; L = N / G local experts; C chunks
    T  tokens on this rank (T_c in chunk c); K moe_topk; D hidden_size
    R  rows this rank receives for its L experts (R_c in chunk c)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from longcat.model.moe.dispatch.all_to_all import AllToAllTokenDispatcher
from longcat.model.moe.dispatch.base import (
    DispatchCounters,
    DispatchedTokens,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.dispatch.permute import local_expert_order, permute_rows

__all__ = ["TokenChunkedTokenDispatcher"]


@dataclass
class _AllChunks:
    """The unpipelined API's handle: each chunk's dispatch handle, rows and the (chunk, expert) sort."""

    handles: list[Any]
    rows_C: list[int]
    sort_R: torch.Tensor | None
    unsort_R: torch.Tensor | None


def chunk_sizes(num_tokens: int, num_chunks: int) -> list[int]:
    """Tokens in each of ``num_chunks`` consecutive parts of ``num_tokens`` (the first ``num_tokens %
    num_chunks`` parts one larger; ``torch.tensor_split``'s sizes)."""
    base, extra = divmod(num_tokens, num_chunks)
    return [base + (1 if c < extra else 0) for c in range(num_chunks)]


class TokenChunkedTokenDispatcher(TokenDispatcher):
    """``AllToAllTokenDispatcher`` run on ``num_chunks`` consecutive parts of the tokens, pipelined
    (module docstring). The sequence of collectives is the same on every ep rank (each chunk's
    count exchange and all-to-alls, chunk by chunk), also for a chunk with no tokens.

    ``run_experts`` pipelines the chunks; ``dispatch_wait`` / ``combine_start`` (the unpipelined API)
    wait for every chunk and hand the experts all rows at once, sorted by local expert.

    Args:
        num_experts: N.
        ep_group: the ep group.
        num_chunks: C >= 1 token parts.

    Raises:
        ValueError: N not divisible by the ep size, or ``num_chunks`` < 1.
    """

    def __init__(self, num_experts: int, *, ep_group: dist.ProcessGroup, num_chunks: int) -> None:
        if num_chunks < 1:
            raise ValueError(f"moe_chunks={num_chunks} must be >= 1")
        self.chunk = AllToAllTokenDispatcher(num_experts, ep_group=ep_group)
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.num_chunks = num_chunks
        self.num_local_experts = self.chunk.num_local_experts
        self.expert_offset = self.chunk.expert_offset

    def reset_counters(self) -> None:
        self.chunk.reset_counters()

    def counters(self) -> DispatchCounters:
        """The counters so far, summed over the chunks; ``num_dispatches`` counts whole dispatches."""
        total = self.chunk.counters()
        return dataclasses.replace(total, num_dispatches=total.num_dispatches // self.num_chunks)

    # ------------------------------------------------------------------ dispatch
    def dispatch_start(self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> Any:
        sizes = chunk_sizes(tokens_TD.shape[0], self.num_chunks)
        return [
            # [T_c, D] -> permute -> all_to_all(ep, async) -> [R_c, D] (AllToAllTokenDispatcher)
            self.chunk.dispatch_start(tokens_cD, expert_ids_TK=ids_cK, gates_TK=gates_cK)
            for tokens_cD, ids_cK, gates_cK in zip(tokens_TD.split(sizes), expert_ids_TK.split(sizes),
                                                   gates_TK.split(sizes))
        ]

    def run_experts(self, pending: Any, *, experts: Callable[..., torch.Tensor]) -> PendingCombine:
        """Per chunk: wait for its dispatch, run the experts on its rows, launch its combine (the next
        chunk's dispatch is in flight meanwhile)."""
        combines = []
        for chunk_pending in pending:
            dispatched = self.chunk.dispatch_wait(chunk_pending)
            expert_out_RD = experts(dispatched.tokens_RD, counts_L=dispatched.counts_L)
            combines.append(self.chunk.combine_start(expert_out_RD, handle=dispatched.handle))
        return PendingCombine(rows=combines, handle=None)

    def dispatch_wait(self, pending: Any) -> DispatchedTokens:
        chunks = [self.chunk.dispatch_wait(p) for p in pending]
        counts_CL = torch.stack([d.counts_L for d in chunks])
        rows_C = [d.tokens_RD.shape[0] for d in chunks]
        tokens_RD = torch.cat([d.tokens_RD for d in chunks])
        sort_R = unsort_R = None
        if len(chunks) > 1 and counts_CL.shape[1] > 1:
            # rows grouped (chunk, local expert) -> (local expert, chunk) for one grouped GEMM
            sort_R, unsort_R = local_expert_order(counts_CL, tokens_RD.shape[0])
            tokens_RD = permute_rows(tokens_RD, perm_R=sort_R, inverse_R=unsort_R)
        handle = _AllChunks([d.handle for d in chunks], rows_C, sort_R, unsort_R)
        return DispatchedTokens(tokens_RD=tokens_RD, counts_L=counts_CL.sum(dim=0), handle=handle)

    # ------------------------------------------------------------------ combine
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: _AllChunks) -> PendingCombine:
        rows_RD = expert_out_RD
        if handle.sort_R is not None:
            assert handle.unsort_R is not None  # set together with sort_R
            rows_RD = permute_rows(rows_RD, perm_R=handle.unsort_R, inverse_R=handle.sort_R)
        combines = [self.chunk.combine_start(rows_cD, handle=h)
                    for rows_cD, h in zip(rows_RD.split(handle.rows_C), handle.handles)]
        return PendingCombine(rows=combines, handle=None)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        outs = [self.chunk.combine_wait(chunk_pending) for chunk_pending in pending.rows]
        return torch.cat(outs) if len(outs) > 1 else outs[0]
