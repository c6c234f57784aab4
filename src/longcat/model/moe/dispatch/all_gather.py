"""The all-gather token dispatcher: every routed token travels once to every ep rank.

The all-to-all dispatcher sends one copy of a token per FFN expert it chose, so its dispatch
"expands the local data size by top-k times" (arXiv 2509.01322 §5.3); this one sends each token
with at least one FFN expert once, with its expert ids and gates, to every rank of the ep group,
and each rank picks out the slots of its own experts. The combine is a reduce-scatter of the
per-source partial outputs. Per rank and direction the bytes to the peers are

    all-to-all: (copies routed to other ranks) x D          ~ T x K_e x D x (G-1)/G
    all-gather: (tokens with an FFN expert) x D x (G-1)      ~ T x D x (G-1)

(plus 2K floats of ids and gates per token for the all-gather), so the all-gather moves fewer bytes
once the FFN experts per token exceed the ep size (``longcat.bench.dispatchers`` measures both).

Zero experts never travel: a token whose K slots are all zero experts is not sent, and the slots of
zero experts inside a sent token carry the id N, which no rank owns
(``counters().zero_expert_rows_sent`` counts sent rows without an FFN slot: always 0).

One dispatch, on every rank g of the ep group (G ranks, L = N / G local experts):

    [T, D] ─ rows of the tokens with an FFN slot ─> [U, D]; ids, gates [U, K] -> meta [U, 2K] fp32
    U ─ all_to_all(ep) ─> U_0 .. U_{G-1}  (host sync: the splits)
    [U, D] x G ─ all_to_all_uneven(ep, async) ─> [A, D], A = sum_g U_g, by source rank   (all-gather)
    [U, 2K] x G ─ all_to_all_uneven(ep, async) ─> [A, 2K]                                  (all-gather)
    [A, D] ─ the slots (a, k) whose expert is local, sorted by local expert ─> [R, D], counts_L [L]

and the combine:

    [R, D] expert rows ─ gate x row (fp32), cast, slot sum per gathered token ─> [A, D] partials
    [A, D] by source ─ all_to_all_uneven(ep, async) ─> [G, U, D]: every rank's partial of my tokens
    [G, U, D] ─ sum over ranks in rank order (0, 1, ..., G-1) ─> [U, D] ─ back to token rows ─> [T, D]

The two all-gathers and the reduce-scatter are carried by uneven all-to-alls: ranks may hold
different numbers of routed tokens (an all-gather of equal blocks would need padding), the bytes on
the wire are those of an all-gather / a reduce-scatter (each row sent once to each peer), and the
reduction of the reduce-scatter is a local sum in a fixed rank order, so the result is the same bits
on every run, schedule and backend (a backend's own reduce-scatter promises no order: NCCL's ring
sums in ring order from a rotating start, and gloo's support for it varies by version). The
backward of the all-gather is again a reduce-scatter of this kind (the reverse all-to-all, then a
fixed-order sum of the G copies' gradients by ``repeat``'s backward), that of the reduce-scatter an
all-gather.

Numbers: every expert sees the rows of the all-to-all dispatcher in the same order (source rank,
then token), so its GEMM and weight gradient are the same; a token's output sums its K weighted
slots per rank and then the ranks' partials, where one process sums the K slots at once, so outputs
agree with one process to rounding (about 1e-7 relative in fp32), not bit for bit.

Shape legend:
    G  ep group size; N FFN experts in total; L = N / G local experts
    T  tokens on this rank (its tp slice under TP); K moe_topk; D hidden_size
    U  tokens of this rank with at least one FFN slot (U_g on rank g); A = sum_g U_g
    R  slots of the A gathered tokens routed to this rank's experts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from longcat.distributed.collectives import (
    AllToAllHandle,
    all_to_all_uneven,
    exchange_counts,
)
from longcat.model.moe.dispatch.all_to_all import RowCounter, wait_rows
from longcat.model.moe.dispatch.base import (
    DispatchCounters,
    DispatchedTokens,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.dispatch.permute import (
    DispatchHandle,
    permute_tokens,
    unpermute_tokens,
    weight_and_unpermute,
)

__all__ = ["AllGatherTokenDispatcher"]

_EXACT_FLOAT_IDS = 2**24  # integers below this are exact in fp32: expert ids travel with the gates


@dataclass
class _PendingGather:
    rows: AllToAllHandle | torch.Tensor  # [A, D] in flight
    meta: AllToAllHandle | torch.Tensor  # [A, 2K] in flight
    routed: DispatchHandle  # this rank's U routed tokens among its T
    sizes_G: list[int]  # U_g: routed tokens of each source rank
    out_dtype: torch.dtype


@dataclass
class _GatherHandle:
    """What combine needs: the local slots of the gathered tokens and this rank's routed tokens."""

    slots: DispatchHandle  # the R local slots among the A x K gathered ones
    gates_R: torch.Tensor
    routed: DispatchHandle
    sizes_G: list[int]
    out_dtype: torch.dtype


class AllGatherTokenDispatcher(TokenDispatcher):
    """Dispatch over the ep group by all-gather and combine by reduce-scatter (module docstring);
    this rank runs experts ``[ep_rank * L, (ep_rank + 1) * L)``, L = N / ep.

    ``dispatch_start`` exchanges the routed-token counts (one host sync) and launches the two
    all-gathers asynchronously; ``dispatch_wait`` waits and selects this rank's slots (a second host
    sync: their number). ``combine_start`` forms the gate-weighted partial output of every gathered
    token and launches the reduce-scatter; ``combine_wait`` waits and sums the partials in rank
    order. Every rank of the ep group must make the same sequence of calls (each is a collective),
    also with nothing to send or receive, and must backpropagate through the result.

    Args:
        num_experts: N, the FFN experts in total (ids >= N are zero experts: never sent).
        ep_group: the ep group (``ProcessGroups.ep_group``).

    Raises:
        ValueError: N not divisible by the ep group size, or N >= 2**24 (ids travel as fp32).
    """

    def __init__(self, num_experts: int, *, ep_group: dist.ProcessGroup) -> None:
        size = ep_group.size()
        if num_experts % size != 0:
            raise ValueError(
                f"n_routed_experts={num_experts} is not divisible by the ep group size {size}: choose ep dividing "
                f"{num_experts}"
            )
        if num_experts >= _EXACT_FLOAT_IDS:
            raise ValueError(
                f"n_routed_experts={num_experts}: the all-gather dispatcher sends expert ids as fp32, exact below "
                f"{_EXACT_FLOAT_IDS}; use parallel.moe_dispatcher=alltoall"
            )
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.num_local_experts = num_experts // size
        self.expert_offset = ep_group.rank() * self.num_local_experts
        self.row_counter = RowCounter()

    def reset_counters(self) -> None:
        self.row_counter.reset()

    def counters(self) -> DispatchCounters:
        """The counters so far (reads one device scalar: a host sync). dispatched_rows counts one copy
        of each routed token per ep rank (own included), received_rows the gathered rows A."""
        return self.row_counter.snapshot()

    # ------------------------------------------------------------------ dispatch
    def dispatch_start(
        self, tokens_TD: torch.Tensor, *, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor
    ) -> _PendingGather:
        N, G = self.num_experts, self.ep_group.size()
        T, K = expert_ids_TK.shape
        is_ffn_TK = expert_ids_TK < N
        token_U = is_ffn_TK.any(dim=-1).nonzero().squeeze(1)  # host sync: U
        U = token_U.shape[0]
        # [G] my U for every peer -> all_to_all(ep) -> [G] U_g of every source (host sync)
        exchanged = exchange_counts(torch.full((G,), U, dtype=torch.int64, device=expert_ids_TK.device),
                                    group=self.ep_group)
        sizes_G = exchanged.output_splits
        routed = DispatchHandle(slot_R=token_U, token_R=token_U, num_tokens=T, top_k=1)
        tokens_UD = permute_tokens(tokens_TD, handle=routed)
        ids_UK = expert_ids_TK.index_select(0, token_U).clamp(max=N)  # zero experts -> N: owned by nobody
        meta_UK2 = torch.cat([gates_TK.index_select(0, token_U).float(), ids_UK.float()], dim=1)
        itemsize = tokens_TD.element_size()
        self.row_counter.record(
            num_sent=U * G, num_received=sum(sizes_G), sent_expert_ids_S=ids_UK.amin(dim=1), num_experts=N,
            peer_bytes=(U * (G - 1) * (tokens_TD.shape[1] * itemsize + 2 * K * 4)  # the all-gathers
                        + (sum(sizes_G) - U) * tokens_TD.shape[1] * itemsize),  # the reduce-scatter
        )
        splits_out, splits_in = [U] * G, sizes_G
        # [U, D] x G (one copy per peer) -> all_to_all(ep, async) -> [A, D] by source rank: all-gather
        rows = all_to_all_uneven(tokens_UD.repeat(G, 1), input_splits=splits_out, output_splits=splits_in,
                                 group=self.ep_group, async_op=True)
        # [U, 2K] x G -> all_to_all(ep, async) -> [A, 2K]: every gathered token's gates and expert ids
        meta = all_to_all_uneven(meta_UK2.repeat(G, 1), input_splits=splits_out, output_splits=splits_in,
                                 group=self.ep_group, async_op=True)
        return _PendingGather(rows, meta, routed, sizes_G, tokens_TD.dtype)

    def dispatch_wait(self, pending: _PendingGather) -> DispatchedTokens:
        L = self.num_local_experts
        rows_AD, meta_AK2 = wait_rows(pending.rows), wait_rows(pending.meta)
        A, K = meta_AK2.shape[0], meta_AK2.shape[1] // 2
        local_AK = meta_AK2[:, K:].detach().long() - self.expert_offset
        key_AxK = torch.where((local_AK >= 0) & (local_AK < L), local_AK, L).reshape(-1)
        counts_L = torch.bincount(key_AxK, minlength=L + 1)[:L]
        R = int(counts_L.sum())  # host sync: the rows of the grouped GEMM
        # Stable: within an expert, source rank then token order (as the all-to-all dispatcher's rows).
        slot_R = torch.argsort(key_AxK, stable=True)[:R]
        slots = DispatchHandle(slot_R=slot_R, token_R=torch.div(slot_R, K, rounding_mode="floor"),
                               num_tokens=A, top_k=K)
        gates_R = meta_AK2[:, :K].reshape(-1).index_select(0, slot_R)
        handle = _GatherHandle(slots, gates_R, pending.routed, pending.sizes_G, pending.out_dtype)
        return DispatchedTokens(tokens_RD=permute_tokens(rows_AD, handle=slots), counts_L=counts_L, handle=handle)

    # ------------------------------------------------------------------ combine
    def combine_start(self, expert_out_RD: torch.Tensor, *, handle: _GatherHandle) -> PendingCombine:
        partial_AD = weight_and_unpermute(expert_out_RD, gates_S=handle.gates_R, handle=handle.slots,
                                          out_dtype=handle.out_dtype)
        G, U = self.ep_group.size(), handle.routed.slot_R.shape[0]
        # [A, D] partials by source rank -> all_to_all(ep, async) -> [G*U, D]: each rank's partial of
        # my U tokens (the reduce-scatter's exchange; its sum is in combine_wait)
        rows = all_to_all_uneven(partial_AD, input_splits=handle.sizes_G, output_splits=[U] * G,
                                 group=self.ep_group, async_op=True)
        return PendingCombine(rows=rows, handle=handle)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        handle: _GatherHandle = pending.handle
        G = self.ep_group.size()
        rows_GxUD = wait_rows(pending.rows)
        parts_GUD = rows_GxUD.view(G, rows_GxUD.shape[0] // G, rows_GxUD.shape[-1])
        out_UD = parts_GUD[0]
        for g in range(1, G):  # the reduce-scatter's sum, in rank order: the same bits on every run
            out_UD = out_UD + parts_GUD[g]
        return unpermute_tokens(out_UD, handle=handle.routed)
