"""ScMoE with chunks: the expert-parallel exchange in C pipelined chunks.

``ChunkedAllToAllTokenDispatcher`` splits one MoE's routed token copies into ``num_chunks`` chunks
and pipelines them (the paper's "ScMoE with chunk", arXiv 2509.01322 §5.3):

    dispatch chunk 0, chunk 1 launched  (under FFN0 + MLA1)
    wait 0 -> GEMM 0 -> combine 0 launched;  wait 1 -> GEMM 1 (under combine 0) -> combine 1 launched
    wait combines (under FFN1) -> gate x row, slot sum

so a chunk's exchange also overlaps the other chunk's expert GEMM (and, in backward, its GEMM's
backward). Chunks are cut by *expert*, not by token position: chunk c holds the copies routed to
local experts ``[c * L/C, (c + 1) * L/C)`` of every ep rank. Every expert then sees exactly the rows,
in the order, of the unchunked exchange, so its GEMM, its weight gradient and every token's output
are bit-identical to ``num_chunks=1``; splitting by token position would sum each expert's weight
gradient in two parts and change its rounding. Two caveats, both about kernels rather than the
math: on CPU, ATen's vectorised element-wise loops (the experts' silu) compute a tail shorter than
two vector blocks with scalar code that rounds differently, so rows are only treated alike
wherever they sit when the expert FFN width is a multiple of 32 (fp32, AVX-512; released: 2048)
and each kernel runs on one thread; on GPU the grouped GEMM may choose other kernels for fewer
groups. Overlap on or off never changes the bits (same kernels on the same shapes).

Layout of one dispatch with C chunks (G ep ranks, L local experts, L_c = L / C):

    [T, D] ─ permute, chunk-major (chunk, global expert id) ─> [S, D] = [S_0 | S_1 | ...]
    [S_c, D] by destination ─ all_to_all_uneven(ep, async) ─> [R_c, D] by (source, expert of chunk c)
    [R_c, D] ─ sort by local expert ─> grouped GEMM over experts [c L_c, (c+1) L_c) ─> unsort
    [R_c, D] ─ all_to_all_uneven(ep, splits swapped, async) ─> [S_c, D];  cat -> [S, D] -> combine

``longcat.model.parallel.expert_parallel.apply_moe_overlap`` swaps in this dispatcher where
``parallel.moe_chunks`` > 1.

Shape legend:
    G  ep group size; N FFN experts; L = N / G local experts; C chunks; L_c = L / C
    T  tokens on this rank; K moe_topk; D hidden_size
    S  rows this rank sends (S_c in chunk c); R rows it receives (R_c in chunk c)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from longcat.distributed.collectives import (
    AllToAllHandle,
    all_to_all_uneven,
    exchange_counts,
)
from longcat.model.moe.dispatch.all_to_all import AllToAllTokenDispatcher, peer_bytes, wait_rows
from longcat.model.moe.dispatch.base import DispatchedTokens, PendingCombine
from longcat.model.moe.dispatch.permute import (
    SourcePermutation,
    count_by_expert,
    local_expert_order,
    permute_rows,
    permute_tokens,
    source_permutation,
    weight_and_unpermute,
)

__all__ = ["ChunkedAllToAllTokenDispatcher"]


@dataclass
class _ChunkedDispatch:
    """A dispatch in flight: one all-to-all per chunk, and what the chunks' combines need.

    received_GCL: int64 [G, C, L_c] rows from each source for each expert of each chunk (device).
    sent_C / received_C: rows this rank sends / receives per chunk (host)."""

    rows: list[AllToAllHandle | torch.Tensor]
    splits_in_GC: list[list[int]]  # [c][g]: rows to rank g in chunk c
    splits_out_GC: list[list[int]]  # [c][g]: rows from rank g in chunk c
    received_GCL: torch.Tensor
    perm: SourcePermutation
    out_dtype: torch.dtype


@dataclass
class _ChunkHandle:
    """What one chunk's combine needs: its splits and the receiver-side sort (None: already sorted)."""

    chunk: int
    sort_R: torch.Tensor | None
    unsort_R: torch.Tensor | None


class ChunkedAllToAllTokenDispatcher(AllToAllTokenDispatcher):
    """``AllToAllTokenDispatcher`` with its exchange split into ``num_chunks`` pipelined chunks by local
    expert (see the module docstring). The sequence of collectives is the same on every ep rank.

    ``run_experts`` pipelines the chunks; ``dispatch_wait`` / ``combine_start`` (the unpipelined API)
    wait for every chunk and hand the experts all rows at once, sorted by local expert as without
    chunks.

    Args:
        num_experts: N.
        ep_group: the ep group.
        num_chunks: C >= 1, dividing the local expert count N / ep.

    Raises:
        ValueError: N not divisible by the ep size, or N / ep not divisible by ``num_chunks``.
    """

    def __init__(self, num_experts: int, *, ep_group: dist.ProcessGroup, num_chunks: int) -> None:
        super().__init__(num_experts, ep_group=ep_group)
        if num_chunks < 1 or self.num_local_experts % num_chunks != 0:
            raise ValueError(
                f"moe_chunks={num_chunks} must be >= 1 and divide the {self.num_local_experts} local experts "
                f"(n_routed_experts={num_experts} / ep={ep_group.size()}): chunks are groups of local experts"
            )
        self.num_chunks = num_chunks

    # ------------------------------------------------------------------ dispatch
    # The pending dispatch is a _ChunkedDispatch, not the parent's _PendingDispatch: dispatch_start and
    # dispatch_wait keep TokenDispatcher's opaque (Any) handle, which only this dispatcher's own
    # dispatch_wait / run_experts consume.
    def dispatch_start(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> Any:
        N, G, L, C = self.num_experts, self.ep_group.size(), self.num_local_experts, self.num_chunks
        counts_N = count_by_expert(expert_ids_TK, num_experts=N)
        # [N] rows per global expert -> all_to_all(ep) -> [G, L] rows per (source, local expert)
        exchanged = exchange_counts(counts_N, group=self.ep_group)
        sent_GC = counts_N.view(G, C, L // C).sum(dim=-1)
        received_GCL = exchanged.received_GE.view(G, C, L // C)
        sent_CG, received_CG = torch.stack([sent_GC.t(), received_GCL.sum(dim=-1).t()]).tolist()  # one host sync
        num_sent = sum(exchanged.input_splits)
        perm = source_permutation(
            expert_ids_TK, gates_TK, num_experts=N, counts_N=counts_N, num_routed=num_sent,
            num_local_experts=L, num_chunks=C,
        )
        tokens_SD = permute_tokens(tokens_TD, handle=perm.handle)

        self.row_counter.record(num_sent=num_sent, num_received=sum(exchanged.output_splits),
                                sent_expert_ids_S=perm.sent_expert_ids_S, num_experts=N,
                                peer_bytes=peer_bytes(exchanged, tokens_TD, group=self.ep_group))

        rows = []
        for c, tokens_ScD in enumerate(tokens_SD.split([sum(s) for s in sent_CG])):
            # [S_c, D] chunk c by destination -> all_to_all(ep, async) -> [R_c, D] by source, then expert
            rows.append(all_to_all_uneven(
                tokens_ScD, input_splits=sent_CG[c], output_splits=received_CG[c], group=self.ep_group,
                async_op=True,
            ))
        return _ChunkedDispatch(rows, sent_CG, received_CG, received_GCL, perm, tokens_TD.dtype)

    def _wait_chunk(self, pending: _ChunkedDispatch, chunk: int) -> tuple[torch.Tensor, torch.Tensor, _ChunkHandle]:
        """Chunk ``chunk``'s rows sorted by local expert [R_c, D], their counts [L_c], its handle."""
        rows_RD = wait_rows(pending.rows[chunk])
        received_GL = pending.received_GCL[:, chunk]
        sort_R = unsort_R = None
        if received_GL.shape[0] > 1 and received_GL.shape[1] > 1:
            sort_R, unsort_R = local_expert_order(received_GL, rows_RD.shape[0])
            rows_RD = permute_rows(rows_RD, perm_R=sort_R, inverse_R=unsort_R)
        return rows_RD, received_GL.sum(dim=0), _ChunkHandle(chunk, sort_R, unsort_R)

    def _combine_chunk(self, expert_out_RD: torch.Tensor, pending: _ChunkedDispatch, handle: _ChunkHandle):
        rows_RD = expert_out_RD
        if handle.sort_R is not None:
            assert handle.unsort_R is not None  # set together with sort_R
            rows_RD = permute_rows(rows_RD, perm_R=handle.unsort_R, inverse_R=handle.sort_R)
        c = handle.chunk
        # [R_c, D] by source -> all_to_all(ep, splits swapped, async) -> [S_c, D] chunk c in send order
        return all_to_all_uneven(
            rows_RD, input_splits=pending.splits_out_GC[c], output_splits=pending.splits_in_GC[c],
            group=self.ep_group, async_op=True,
        )

    def run_experts(self, pending: _ChunkedDispatch, *, experts: Callable[..., torch.Tensor]) -> PendingCombine:
        """Per chunk: wait for its dispatch, run its experts, launch its combine (the next chunk's
        exchange is in flight meanwhile)."""
        chunk_size = self.num_local_experts // self.num_chunks
        combines = []
        for c in range(self.num_chunks):
            tokens_RD, counts_L, handle = self._wait_chunk(pending, c)
            expert_out_RD = experts(tokens_RD, counts_L=counts_L, first_expert=c * chunk_size)
            combines.append(self._combine_chunk(expert_out_RD, pending, handle))
        return PendingCombine(rows=combines, handle=pending)

    def dispatch_wait(self, pending: Any) -> DispatchedTokens:
        chunks = [self._wait_chunk(pending, c) for c in range(self.num_chunks)]
        # Chunk-major rows sorted by local expert within each chunk = sorted by local expert.
        tokens_RD = torch.cat([rows for rows, _, _ in chunks])
        counts_L = torch.cat([counts for _, counts, _ in chunks])
        return DispatchedTokens(tokens_RD=tokens_RD, counts_L=counts_L, handle=(pending, [h for _, _, h in chunks]))

    # ------------------------------------------------------------------ combine
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle) -> PendingCombine:
        pending, chunk_handles = handle
        sizes = [sum(s) for s in pending.splits_out_GC]
        combines = [
            self._combine_chunk(rows_RD, pending, h) for rows_RD, h in zip(expert_out_RD.split(sizes), chunk_handles)
        ]
        return PendingCombine(rows=combines, handle=pending)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        chunks = [wait_rows(rows) for rows in pending.rows]
        rows_SD = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        dispatch: _ChunkedDispatch = pending.handle
        perm = dispatch.perm
        return weight_and_unpermute(rows_SD, gates_S=perm.gates_S, handle=perm.handle, out_dtype=dispatch.out_dtype)

