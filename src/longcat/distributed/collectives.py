"""Autograd-aware collectives over an explicit process group (functions, no globals).

Shape legend:
    G   size of the group the collective runs over
    T   local tokens (rows) on this rank; R rows received by this rank
    D   hidden size (any trailing dims are carried along)
    E   routed experts in total; E_local = E // G experts owned by each rank of an ep group

Tensor-parallel ops follow Megatron-LM (Shoeybi et al. 2019, §3): ``copy_to_group`` is "f"
(identity forward, all-reduce backward) before a column-parallel layer, ``all_reduce_sum`` is "g"
(all-reduce forward, identity backward) after a row-parallel layer. With sequence parallelism
(Korthikanti et al. 2022) they become ``all_gather_along`` / ``reduce_scatter_along``.
``split_to_group`` / ``gather_from_group`` move a *replicated* tensor (every rank holds the full,
identical gradient) in and out of a split over the group: Megatron's
``scatter_to_sequence_parallel_region`` and ``gather_from_sequence_parallel_region(
tensor_parallel_output_grad=False)``; used for SP's replicated consumers and the MoE under tp.

Every function returns its input unchanged (the same tensor object) on a size-1 group, so
single-device math is exact, and never touches ``torch.distributed`` in that case.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from longcat.distributed import overlap

__all__ = [
    "AllToAllHandle",
    "ExchangedCounts",
    "all_gather_along",
    "all_reduce_sum",
    "all_to_all_uneven",
    "copy_to_group",
    "exchange_counts",
    "gather_from_group",
    "reduce_scatter_along",
    "split_to_group",
]

# torch >= 2.10 names; older releases only have the *_tensor spellings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------------- TP: f and g


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        # [*] partial sums -> all_reduce(group) -> [*] full sums
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        # [*] partial grads -> all_reduce(group) -> [*] full grads
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron "g": forward sums ``x`` over ``group``; backward passes the gradient through.

    Use after a row-parallel matmul whose per-rank outputs are partial sums.

    Args:
        x: any shape, the same on every rank of ``group``; a partial sum.
        group: usually ``tp_group``.

    Returns:
        Tensor shaped like ``x``, the sum over the group (a new tensor; ``x`` is not modified).
    """
    if group.size() == 1:
        return x
    return _AllReduceSum.apply(x, group)


def copy_to_group(x: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron "f": forward is the identity; backward sums the gradient over ``group``.

    Use on a replicated activation before a column-parallel matmul, so that its gradient collects
    the contributions of every rank's shard.

    Args:
        x: any shape, replicated over ``group``.
        group: usually ``tp_group``.
    """
    if group.size() == 1:
        return x
    return _CopyToGroup.apply(x, group)


# --------------------------------------------------------------------------------- SP: gather / scatter


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = group.size()
    x_first = x.movedim(dim, 0).contiguous()
    out = x_first.new_empty((size * x_first.shape[0],) + tuple(x_first.shape[1:]))
    # [n, *] on each rank (dim moved first) -> all_gather(group) -> [G*n, *], rank order
    _all_gather_single(out, x_first, group=group)
    return out.movedim(0, dim)


def _scatter_sum(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = group.size()
    x_first = x.movedim(dim, 0).contiguous()
    out = x_first.new_empty((x_first.shape[0] // size,) + tuple(x_first.shape[1:]))
    # [G*n, *] partial sums (dim moved first) -> reduce_scatter(group) -> [n, *], chunk group_rank
    _reduce_scatter_single(out, x_first, group=group)
    return out.movedim(0, dim)


class _AllGatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Every rank consumed the whole gathered tensor, so the local shard's gradient is the sum
        # of all ranks' gradients for that chunk.
        return _scatter_sum(grad_out, ctx.dim, ctx.group), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _scatter_sum(x, dim, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _gather(grad_out, ctx.dim, ctx.group), None, None


def all_gather_along(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' shards along ``dim`` (rank order); backward reduce-scatters.

    Args:
        x: local shard, e.g. ``[S/G, B, D]`` with ``dim=0`` for sequence parallelism; every rank
            must pass the same shape.
        dim: the dimension to concatenate along (negative allowed).
        group: usually ``tp_group``.

    Returns:
        ``x`` with ``shape[dim]`` multiplied by G, identical on every rank.
    """
    if group.size() == 1:
        return x
    return _AllGatherAlong.apply(x, dim, group)


def reduce_scatter_along(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over ranks, then keep this rank's chunk along ``dim``; backward all-gathers.

    Args:
        x: partial sums, e.g. ``[S, B, D]`` with ``dim=0``; the same shape on every rank.
        dim: the dimension to split (negative allowed); ``x.shape[dim]`` must divide by G.
        group: usually ``tp_group``.

    Returns:
        ``[S/G, B, D]``: chunk ``group_rank`` of the sum.

    Raises:
        ValueError: ``x.shape[dim]`` not divisible by the group size.
    """
    if group.size() == 1:
        return x
    _check_divisible(x, dim, group.size(), "reduce_scatter_along", "pad that dimension to a multiple of the group size")
    return _ReduceScatterAlong.apply(x, dim, group)


def _check_divisible(x: torch.Tensor, dim: int, size: int, op: str, fix: str) -> None:
    if x.shape[dim] % size != 0:
        raise ValueError(f"{op}: x.shape[{dim}]={x.shape[dim]} is not divisible by the group size {size}: {fix}")


# ------------------------------------------------------ replicated tensors: split and gather back


def _own_chunk(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return x.chunk(group.size(), dim=dim)[group.rank()].contiguous()


class _SplitToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _own_chunk(x, dim, group)

    @staticmethod
    def backward(ctx, grad_chunk: torch.Tensor):
        # [T/G, D] grad of this rank's chunk -> all_gather(group) -> [T, D] full grad, rank order
        return _gather(grad_chunk.contiguous(), ctx.dim, ctx.group), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        # [T/G, D] this rank's chunk -> all_gather(group) -> [T, D] replicated, rank order
        return _gather(x.contiguous(), dim, group)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        # The full gradient is identical on every rank: keep this rank's chunk, no reduction.
        return _own_chunk(grad_full, ctx.dim, ctx.group), None, None


def split_to_group(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's chunk (``group.rank()`` of ``group.size()`` equal chunks) of a replicated tensor.

    Args:
        x: ``[T, D...]`` (along ``dim``), identical on every rank of ``group``.
        dim: the dimension to split.
        group: usually ``tp_group``.

    Returns:
        ``[T/G, D...]``; its backward all-gathers, so ``x.grad`` is the full gradient on every rank
        (unlike ``reduce_scatter_along``, whose backward is meant for partial sums).

    Raises:
        ValueError: ``x.shape[dim]`` not divisible by the group size.
    """
    if group.size() == 1:
        return x
    _check_divisible(x, dim, group.size(), "split_to_group",
                     "choose that dimension a multiple of the group size (the MoE under tp splits the "
                     "micro-batch's B*S tokens; sequence parallelism splits the sequence length)")
    return _SplitToGroup.apply(x, dim, group)


def gather_from_group(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' chunks along ``dim`` into a replicated tensor; backward keeps this rank's
    chunk of the (replicated, identical) gradient, without a reduction (unlike ``all_gather_along``).

    Args:
        x: ``[T/G, D...]`` this rank's chunk; every rank passes the same shape.
        dim: the dimension to concatenate.
        group: usually ``tp_group``.

    Returns:
        ``[T, D...]``, identical on every rank of ``group``.
    """
    if group.size() == 1:
        return x
    return _GatherFromGroup.apply(x, dim, group)


# --------------------------------------------------------------------------------- EP: all-to-all


class ExchangedCounts(NamedTuple):
    """Result of ``exchange_counts``.

    Attributes:
        received_GE: ``[G, E_local]`` int64, row g = tokens that rank g sends to each of this
            rank's experts (same device as the input).
        input_splits: length G, rows this rank sends to each peer (row counts for all_to_all).
        output_splits: length G, rows this rank receives from each peer.
    """

    received_GE: torch.Tensor
    input_splits: list[int]
    output_splits: list[int]


def exchange_counts(counts_E: torch.Tensor, *, group: dist.ProcessGroup) -> ExchangedCounts:
    """Tell every rank how many tokens it will receive, per peer and per local expert.

    Experts are sharded contiguously by global id: rank g of ``group`` owns experts
    ``[g * E_local, (g + 1) * E_local)``. One host sync (``tolist``) produces the splits.

    Args:
        counts_E: ``[E]`` integer, tokens on this rank routed to each global FFN expert
            (zero-computation experts excluded: they never travel).
        group: the ep group.

    Returns:
        ExchangedCounts (see there).

    Raises:
        ValueError: ``counts_E`` not 1-D, or E not divisible by the group size.
    """
    size = group.size()
    if counts_E.dim() != 1 or counts_E.shape[0] % size != 0:
        raise ValueError(
            f"exchange_counts: counts_E has shape {tuple(counts_E.shape)}, expected [E] with E divisible by the "
            f"ep group size {size}: pass one count per routed expert and an ep that divides n_routed_experts"
        )
    counts_E = counts_E.to(torch.int64)
    sent_GE = counts_E.view(size, -1)
    if size == 1:
        received_GE = sent_GE
    else:
        received = torch.empty_like(counts_E)
        # [G*E_local] counts per destination's experts -> all_to_all(ep) -> [G*E_local] per source
        dist.all_to_all_single(received, counts_E.contiguous(), group=group)
        received_GE = received.view(size, -1)
    return ExchangedCounts(
        received_GE=received_GE,
        input_splits=sent_GE.sum(dim=1).tolist(),
        output_splits=received_GE.sum(dim=1).tolist(),
    )


# An uneven all-to-all is two autograd nodes, so that its backward overlaps as its forward does:
#
#   forward:  issue node (launch)  ── compute recorded in between ──>  wait node (wait, pass on)
#   backward: wait node (launch the gradient's reverse exchange)  ── the same compute's backward ──>
#             issue node (wait, return the input's gradient)
#
# The autograd engine runs ready nodes in decreasing creation order, so the backward of whatever
# was recorded between the issue and the wait (the ScMoE dense branch) runs while the gradient
# exchange is in flight (gloo's threads on CPU, the comm stream on GPU: ``longcat.distributed.overlap``),
# and nothing reads that gradient before the issue node's wait. A synchronous call is the same two
# nodes waited at once, so the numbers do not depend on the schedule.


class _Exchange:
    """What the issue node and the wait node of one all-to-all share: the forward's and the backward's
    collective in flight, and the wait key / recorder captured at the forward's launch."""

    __slots__ = ("forward", "backward", "label", "recorder")

    def __init__(self) -> None:
        self.forward: Optional[overlap.InFlight] = None
        self.backward: Optional[overlap.InFlight] = None
        self.label = overlap.current_comm_label()
        self.recorder = overlap.current_recorder()


def _launch_all_to_all(
    x: torch.Tensor, input_splits: list[int], output_splits: list[int], group: dist.ProcessGroup, *, key: str,
    recorder: Optional[overlap.CommWaitRecorder],
) -> overlap.InFlight:
    send = x.contiguous()
    out = send.new_empty((sum(output_splits),) + tuple(send.shape[1:]))
    # [T, D] rows grouped by destination -> all_to_all(group, async) -> [R, D] rows grouped by source
    return overlap.launch(
        lambda: dist.all_to_all_single(out, send, output_splits, input_splits, group=group, async_op=True),
        output=out, inputs=(send,), key=key, recorder=recorder,
    )


class _AllToAllIssue(torch.autograd.Function):
    """Issue node. Forward: launch the all-to-all and return its receive buffer (not to be read
    before the wait node). Backward: wait for the reverse all-to-all that the wait node's backward
    launched, and return it as the input's gradient."""

    @staticmethod
    def forward(ctx, x, input_splits, output_splits, group, exchange):
        ctx.exchange = exchange
        exchange.forward = _launch_all_to_all(
            x, input_splits, output_splits, group, key=f"{exchange.label}.forward", recorder=exchange.recorder
        )
        return exchange.forward.output

    @staticmethod
    def backward(ctx, _placeholder):
        inflight, ctx.exchange.backward = ctx.exchange.backward, None
        assert inflight is not None, "the wait node's backward launches the reverse all-to-all first"
        return inflight.wait(), None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    """Wait node. Forward: wait for the all-to-all, pass the received rows on. Backward: launch the
    reverse all-to-all of the gradient (splits swapped) and return at once; the issue node waits."""

    @staticmethod
    def forward(ctx, received, exchange, input_splits, output_splits, group):
        ctx.exchange, ctx.input_splits, ctx.output_splits, ctx.group = exchange, input_splits, output_splits, group
        exchange.forward.wait()
        exchange.forward = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad_RD):
        exchange = ctx.exchange
        # [R, D] grads by source -> all_to_all(group, splits swapped, async) -> [T, D] grads by destination
        exchange.backward = _launch_all_to_all(
            grad_RD, ctx.output_splits, ctx.input_splits, ctx.group, key=f"{exchange.label}.backward",
            recorder=exchange.recorder,
        )
        # Only a placeholder for the issue node (shaped like the receive buffer): it returns the
        # real gradient once the exchange is done.
        return grad_RD, None, None, None, None


class AllToAllHandle:
    """An all-to-all in flight: ``wait()`` returns its output, blocking until the exchange is done
    (on CPU; on GPU the compute stream is ordered after it instead). Waiting twice is a no-op.

    The output tensor must not be read before ``wait()``, nor the input modified in place. The
    output of ``wait()`` carries the autograd graph (issue node -> wait node).
    """

    def __init__(self, output: torch.Tensor, pending: Optional[tuple] = None):
        self._output = output
        self._pending = pending  # (exchange, input_splits, output_splits, group) until waited

    def wait(self) -> torch.Tensor:
        if self._pending is not None:
            exchange, input_splits, output_splits, group = self._pending
            self._pending = None
            self._output = _AllToAllWait.apply(self._output, exchange, input_splits, output_splits, group)
        return self._output

    def is_completed(self) -> bool:
        return self._pending is None or self._pending[0].forward.is_completed()


def _check_splits(x: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int], size: int) -> None:
    if len(input_splits) != size or len(output_splits) != size:
        raise ValueError(
            f"all_to_all_uneven: len(input_splits)={len(input_splits)} and len(output_splits)={len(output_splits)} "
            f"must both equal the group size {size}: pass one split per rank of the group"
        )
    if any(s < 0 for s in input_splits) or any(s < 0 for s in output_splits):
        raise ValueError(
            f"all_to_all_uneven: negative split in input_splits={list(input_splits)} or "
            f"output_splits={list(output_splits)}: splits are row counts >= 0"
        )
    if sum(input_splits) != x.shape[0]:
        raise ValueError(
            f"all_to_all_uneven: sum(input_splits)={sum(input_splits)} != x.shape[0]={x.shape[0]}: "
            "the splits must partition the rows of x (sorted by destination rank)"
        )


def all_to_all_uneven(
    x_TD: torch.Tensor,
    *,
    input_splits: Sequence[int],
    output_splits: Sequence[int],
    group: dist.ProcessGroup,
    async_op: bool = False,
):
    """Send ``input_splits[g]`` consecutive rows of ``x_TD`` to rank g; receive ``output_splits[g]`` from g.

    Differentiable: the backward is the reverse all-to-all (splits swapped), so every rank of the
    group must backpropagate through the output, even an empty one (keep it in the loss), or the
    peers' backward waits forever. Zero-row sends and receives, and an empty ``x_TD``, are fine.
    Take the splits from ``exchange_counts``.

    Args:
        x_TD: ``[T, D...]`` rows sorted by destination rank; ``T = sum(input_splits)``.
        input_splits: length G, rows to each rank of ``group``.
        output_splits: length G, rows from each rank; must match the peers' input_splits.
        group: the ep group.
        async_op: if True, return an ``AllToAllHandle`` at once; ``handle.wait()`` gives the
            output, so compute can run while the exchange is in flight. Forward and backward are
            bit-identical to the synchronous path (the same nodes, waited at once).

    Returns:
        ``[R, D...]`` with ``R = sum(output_splits)``, rows grouped by source rank in rank order;
        or an ``AllToAllHandle`` for it when ``async_op``.

    Raises:
        ValueError: split lengths differ from the group size, a split is negative, or
            ``sum(input_splits) != T``.
    """
    size = group.size()
    input_splits, output_splits = [int(s) for s in input_splits], [int(s) for s in output_splits]
    _check_splits(x_TD, input_splits, output_splits, size)
    if size == 1:
        if input_splits != output_splits:
            raise ValueError(
                f"all_to_all_uneven on a size-1 group: input_splits={input_splits} must equal "
                f"output_splits={output_splits} (a rank can only receive what it sends to itself)"
            )
        return AllToAllHandle(x_TD, None) if async_op else x_TD
    exchange = _Exchange()
    received_RD = _AllToAllIssue.apply(x_TD, input_splits, output_splits, group, exchange)
    handle = AllToAllHandle(received_RD, (exchange, input_splits, output_splits, group))
    return handle if async_op else handle.wait()
