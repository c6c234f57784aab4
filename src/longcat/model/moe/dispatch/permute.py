"""Permutations shared by the token dispatchers (arXiv 2509.01322 §2.1, §5.3): token copies into send order
and back, rows into local-expert order and back.

The sender side (``source_permutation``) sorts this rank's FFN-expert slots by global expert id (so
by destination rank, then local expert); ``permute_tokens`` gathers them, ``weight_and_unpermute``
brings expert outputs home. The receiver side (``local_expert_order``, ``permute_rows``) turns rows
grouped by (source rank, local expert) into rows grouped by local expert for the grouped GEMM.

Both directions are deterministic: the permute's backward and the combine gather the rows into slot
order (token t's slots t*K+k, k ascending) and sum each token's segment in that order
(reduced precision accumulates in fp32, as a sum over K does), never an accumulating scatter whose
order depends on the hardware. On the CPU the sum is ``index_add_`` into zeros, which adds rows one
after another in index order (4-6x faster there than ``torch.segment_reduce``, the same bits:
``0 + a + b + ...``); elsewhere ``torch.segment_reduce`` (CUDA's ``index_add_`` is atomic, so its
order is not fixed). The result is the bits of a zero-filled [T*K, D]
slot buffer summed over K, without that buffer (which cost more than the sum: a fresh 50 MB
zero-fill per call at T=2048, K=12, D=512). The gate multiply of the combine is done in place on the
gathered rows, and its backward forms the gate gradient and the row gradient from one gathered
[R, D] buffer (``docs/benchmarks.md``, MoE block). On the CPU the combine's gathered rows, its
backward's gathered gradient and the permute backward's gathered rows are written into the reused
workspace (``longcat.model.moe.workspace.scratch``) rather than fresh memory.

Shape legend:
    T  tokens (local)
    K  moe_topk (slots per token)
    D  hidden_size
    N  FFN experts in total (global ids 0..N-1; ids >= N are zero experts)
    G  ep group size; L local FFN experts
    S  routed rows sent by this rank: its token copies assigned to FFN experts, sorted by global
       expert id (= by destination rank, then local expert)
    R  routed rows for the local experts (sum of counts_L); R = S without expert parallelism
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longcat.model.moe.workspace import scratch

__all__ = [
    "DispatchHandle",
    "SourcePermutation",
    "count_by_expert",
    "local_expert_order",
    "permute_rows",
    "permute_tokens",
    "source_permutation",
    "unpermute_tokens",
    "weight_and_unpermute",
]


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
    _slot_order: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _slot_tokens: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def slot_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_R, lengths_T): ``order_R`` (int64 [R]) lists the rows in slot order (token-major, then
        k), ``lengths_T`` (int64 [T]) how many consecutive rows of that order each token has (its FFN
        slots, 0..K). Computed once per handle (the combine and the permute's backward share it)."""
        if self._slot_order is None:
            order_R = torch.argsort(self.slot_R)  # slots are unique: any sort is the same permutation
            lengths_T = torch.bincount(self.token_R, minlength=self.num_tokens)
            self._slot_order = (order_R, lengths_T)
        return self._slot_order

    def slot_tokens(self) -> torch.Tensor:
        """int64 [R]: the token of each row in slot order (``token_R[order_R]``, non-decreasing)."""
        if self._slot_tokens is None:
            order_R, _ = self.slot_order()
            self._slot_tokens = self.token_R.index_select(0, order_R)
        return self._slot_tokens


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
    then chunk 1, ... (``ChunkedAllToAllTokenDispatcher``). Each expert's slots stay in token order.
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
    sum -> [T, D]. The bits of ``unpermute_tokens((rows_SD * gates_S[:, None]).to(out_dtype))`` and of
    its autograd backward, with one [S, D] temporary per direction instead of three."""
    return _WeightAndUnpermute.apply(rows_SD, gates_S, handle, out_dtype)


def _gather_rows(rows_RD: torch.Tensor, index_R: torch.Tensor) -> torch.Tensor:
    """``rows_RD.index_select(0, index_R)`` into ``workspace.scratch`` (same bits)."""
    out = scratch((index_R.shape[0], *rows_RD.shape[1:]), dtype=rows_RD.dtype, device=rows_RD.device)
    return torch.index_select(rows_RD, 0, index_R, out=out)


def _segment_sum(rows_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """[R, D] rows in slot order (consecutive per token) -> [T, D] sums in row order, ``0 + a + b + ...``;
    fp32 accumulation for reduced precision (the bits of a sum over a zero-padded K dim). On the CPU
    ``index_add_`` (sequential in index order there), elsewhere ``torch.segment_reduce``: same bits."""
    _, lengths_T = handle.slot_order()
    if rows_RD.shape[0] == 0:
        return rows_RD.new_zeros(lengths_T.shape[0], rows_RD.shape[-1])
    acc_RD = rows_RD if rows_RD.dtype in (torch.float32, torch.float64) else rows_RD.float()
    if acc_RD.device.type == "cpu":
        sums_TD = acc_RD.new_zeros(lengths_T.shape[0], acc_RD.shape[-1])
        sums_TD.index_add_(0, handle.slot_tokens(), acc_RD)
    else:
        sums_TD = torch.segment_reduce(acc_RD, "sum", lengths=lengths_T, unsafe=True)
    return sums_TD.to(rows_RD.dtype)


def _sum_slots(rows_RD: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """[R, D] -> [T, D]: each token's rows summed in slot order (each slot holds at most one row)."""
    order_R, _ = handle.slot_order()
    return _segment_sum(_gather_rows(rows_RD, order_R), handle)


# rows per block of the gate gradient's row-wise dot product: a temporary that stays in the CPU's
# cache (256 x 512 fp32 = 512 KiB), the same bits as one [S, D] product
_GATE_GRAD_BLOCK = 256


class _WeightAndUnpermute(torch.autograd.Function):
    """(rows_SD [S, D], gates_S fp32 [S]) -> [T, D] sum over each token's slots of gate x row.

    Forward: gather the rows into slot order, multiply by their gates (in place when the product's
    dtype is the row dtype), segment sum. Backward: G = grad_TD gathered to send order [S, D]; the
    gate gradient is the row-wise dot of G and the rows (in row blocks, so no [S, D] product is
    materialised), the row gradient is G x gate (in place on G). Every value is the one autograd
    computes for ``unpermute_tokens((rows * gates[:, None]).to(out_dtype))``: the same elementwise
    products and reductions over the same operands."""

    @staticmethod
    def forward(ctx, rows_SD: torch.Tensor, gates_S: torch.Tensor, handle: DispatchHandle,
                out_dtype: torch.dtype) -> torch.Tensor:
        order_R, _ = handle.slot_order()
        prod_dtype = torch.result_type(rows_SD, gates_S)
        ordered_SD = _gather_rows(rows_SD, order_R)
        gates_col = gates_S.index_select(0, order_R)[:, None]
        if ordered_SD.dtype == prod_dtype == out_dtype:
            weighted_SD = ordered_SD.mul_(gates_col)
        else:
            weighted_SD = (ordered_SD * gates_col).to(out_dtype)
        ctx.save_for_backward(rows_SD, gates_S)
        ctx.handle, ctx.prod_dtype = handle, prod_dtype
        return _segment_sum(weighted_SD, handle)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        rows_SD, gates_S = ctx.saved_tensors
        handle: DispatchHandle = ctx.handle
        grad_SD = _gather_rows(grad_TD, handle.token_R)
        if grad_SD.dtype != ctx.prod_dtype:
            grad_SD = grad_SD.to(ctx.prod_dtype)
        grad_gates_S = None
        if ctx.needs_input_grad[1]:
            S = rows_SD.shape[0]
            grad_gates_S = torch.empty(gates_S.shape, dtype=ctx.prod_dtype, device=gates_S.device)
            block_bD = grad_SD.new_empty(min(S, _GATE_GRAD_BLOCK), grad_SD.shape[-1])  # stays in cache
            for lo in range(0, S, _GATE_GRAD_BLOCK):
                hi = min(S, lo + _GATE_GRAD_BLOCK)
                product_bD = torch.mul(grad_SD[lo:hi], rows_SD[lo:hi], out=block_bD[: hi - lo])
                torch.sum(product_bD, dim=-1, out=grad_gates_S[lo:hi])
            grad_gates_S = grad_gates_S.to(gates_S.dtype)
        grad_rows_SD = None
        if ctx.needs_input_grad[0]:
            gates_col = gates_S[:, None]
            if grad_SD.dtype == rows_SD.dtype and torch.result_type(grad_SD, gates_col) == grad_SD.dtype:
                grad_rows_SD = grad_SD.mul_(gates_col)
            else:
                grad_rows_SD = (grad_SD * gates_col).to(rows_SD.dtype)
        return grad_rows_SD, grad_gates_S, None, None


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


def local_expert_order(received_GL: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
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
