"""Split a replicated token set over the tp group and gather it back (Megatron-style MoE under TP).

Activations outside the MoE are replicated over tp and every tp rank holds the *full* gradient of
a replicated tensor (Megatron TP without sequence parallelism). The MoE layer gives each tp rank
1/tp of the micro-batch's tokens, so:

- ``split_to_group``: forward keeps this rank's chunk; backward all-gathers the chunks' grads, so
  the replicated input's grad is full (and identical) on every rank.
- ``gather_from_group``: forward all-gathers the chunks; backward keeps this rank's chunk of the
  (replicated, identical) output grad.

These are Megatron's ``scatter_to_sequence_parallel_region`` and
``gather_from_sequence_parallel_region(tensor_parallel_output_grad=False)``. They differ from
``longcat.distributed.all_gather_along`` / ``reduce_scatter_along``, whose backward sums over the
group (right for partial sums, tp times too large for replicated grads).

Shape legend:
    G  size of the group (tp)
    T  tokens of the micro-batch (replicated); T/G per rank after the split
    D  trailing dims (carried along)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longcat.distributed.collectives import all_gather_along


def _chunk(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    return x.chunk(group.size(), dim=dim)[group.rank()].contiguous()


class _SplitToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _chunk(x, dim, group)

    @staticmethod
    def backward(ctx, grad_chunk: torch.Tensor):
        # [T/G, D] grad of this rank's chunk -> all_gather(tp) -> [T, D] full grad, rank order.
        # all_gather_along is an autograd op; under no_grad here it is just the collective.
        return all_gather_along(grad_chunk.contiguous(), dim=ctx.dim, group=ctx.group), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        # [T/G, D] this rank's chunk -> all_gather(tp) -> [T, D] replicated, rank order
        return all_gather_along(x.contiguous(), dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        return _chunk(grad_full, ctx.dim, ctx.group), None, None


def _check_divisible(x: torch.Tensor, dim: int, size: int, what: str) -> None:
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"{what}: x.shape[{dim}]={x.shape[dim]} is not divisible by the tp group size {size}: the MoE "
            f"splits the micro-batch's B*S tokens over tp, so choose B*S a multiple of {size}"
        )


def split_to_group(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's chunk (``group.rank()`` of ``group.size()`` equal chunks) of a replicated tensor.

    Args:
        x: ``[T, D...]`` (along ``dim``), identical on every rank of ``group``.
        dim: the dimension to split.
        group: the tp group.

    Returns:
        ``[T/G, D...]``; its backward all-gathers, so ``x.grad`` is the full gradient on every rank.

    Raises:
        ValueError: ``x.shape[dim]`` not divisible by the group size.
    """
    if group.size() == 1:
        return x
    _check_divisible(x, dim, group.size(), "split_to_group")
    return _SplitToGroup.apply(x, dim, group)


def gather_from_group(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' chunks along ``dim`` into a replicated tensor; backward keeps this rank's
    chunk of the (replicated) gradient.

    Args:
        x: ``[T/G, D...]`` this rank's chunk; every rank passes the same shape.
        dim: the dimension to concatenate.
        group: the tp group.

    Returns:
        ``[T, D...]``, identical on every rank of ``group``.
    """
    if group.size() == 1:
        return x
    return _GatherFromGroup.apply(x, dim, group)
