"""Tensor parallelism (TP) and sequence parallelism (SP) building blocks, Megatron-style, model-agnostic.

After Megatron-LM (Shoeybi et al. 2019, §3) and, for SP, Korthikanti et al. 2022. Each layer is built
from a full one (``from_linear`` / ``from_embedding``, the same weights on every rank) and holds this
tp rank's shard as a plain tensor under the same parameter names. Which layer of a model becomes
which is the model's plan (LongCat-Flash: ``longcat.model.parallel.tensor_parallel``).

    ColumnParallelLinear     weight [F/tp, D]  Shard(0)   output features split
    RowParallelLinear        weight [D, F/tp]  Shard(1)   input features split; bias replicated
    VocabParallelEmbedding   weight [V/tp, D]  Shard(0)   vocabulary split
    SequenceParallelLinear   replicated weight applied to a sequence shard (SP)

Activations. Without SP the residual stream [B, S, D] is replicated over tp: activations enter the
tensor-parallel region through Megatron's "f" (``copy_to_group``, ``EnterParallelRegion``) and
row-parallel partial sums leave it through "g" (``all_reduce_sum``). With SP the residual stream is
[B, S/tp, D], chunk ``tp_rank`` of the sequence (dim 1): "f" becomes an all-gather and "g" a
reduce-scatter, so norms and residual adds run on 1/tp of the tokens; S must then be divisible by
tp. ``GatherSequence`` / ``ScatterSequence`` move a tensor between the sequence shard and the full,
tp-replicated sequence for consumers that compute the same thing on every tp rank.

Gradient contract. Every tp rank computes the same losses from the outputs and backpropagates them.
After backward, with no reduction by the caller, a sharded parameter's grad is its shard of the
single-process grad, and a replicated one's is the full single-process grad, identical on every tp
rank. Under SP a replicated weight applied to a sequence shard sees only that shard's tokens:
``SequenceParallelLinear`` and the row-parallel bias pass the weight through ``copy_to_group``, which
sums its grad over tp inside the backward (so gradient accumulation, activation checkpointing and
parameter-swapping wrappers stay correct).

Loss. A column-parallel LM head emits vocab-sharded logits [B, S, V/tp]: take the loss with
``vocab_parallel_cross_entropy_sum`` (the full [B, S, V] logits never exist on one rank), or skip the
logits with ``longcat.distributed.linear_cross_entropy.lm_head_cross_entropy_sum`` (fused head + loss).

Checkpoints. ``describe_tp_shards`` maps each parameter name to ``TPShard(global_shape, shard_dim,
offset)``: the local tensor is ``global.narrow(shard_dim, offset, local.shape[shard_dim])``, or the
whole of it when shard_dim is None (replicated over tp). For torch.distributed.checkpoint,
``DTensor.from_local(local, groups.dense_mesh["tp"], [Shard(shard_dim)] or [Replicate()])`` is the
global tensor. Optimizer states shaped like their parameter map the same way. ``gather_tp_tensors``
assembles full tensors (export, tests).

Shape legend:
    B  batch
    S  sequence (S/tp per rank under SP, along dim 1)
    D  hidden_size
    V  vocab_size (V/tp per rank in a vocab shard)
    T  B * S tokens (flattened)
    F  a column-parallel layer's output features / a row-parallel layer's input features
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longcat.distributed.collectives import (
    all_gather_along,
    all_reduce_sum,
    copy_to_group,
    gather_from_group,
    reduce_scatter_along,
    split_to_group,
)

__all__ = [
    "ColumnParallelLinear",
    "EnterParallelRegion",
    "GatherSequence",
    "RowParallelLinear",
    "ScatterSequence",
    "SequenceParallelLinear",
    "TPShard",
    "VocabParallelEmbedding",
    "describe_tp_shards",
    "enter_parallel_region",
    "gather_tp_tensors",
    "vocab_parallel_cross_entropy_sum",
]

SEQ_DIM = 1  # activations are [B, S, ...]: SP shards dim 1


# ------------------------------------------------------------------------------- region boundaries


def _enter_region(x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    if sequence_parallel:
        # [B, S/tp, *] sequence shard -> all_gather(tp, dim 1) -> [B, S, *]; backward reduce-scatters
        return all_gather_along(x, dim=SEQ_DIM, group=group)
    # [B, S, *] replicated -> identity; backward all_reduce(tp) of the ranks' partial grads
    return copy_to_group(x, group=group)


def enter_parallel_region(x: torch.Tensor, *, group: dist.ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    """Megatron "f" as a function (``EnterParallelRegion``'s forward): x [B, S, *] replicated -> the same
    tensor, backward all_reduce(tp); with SP x [B, S/tp, *] -> all_gather(tp) -> [B, S, *]."""
    return _enter_region(x, group, sequence_parallel)


def _leave_region(x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    if sequence_parallel:
        # [B, S, *] partial sums -> reduce_scatter(tp, dim 1) -> [B, S/tp, *]; backward all-gathers
        return reduce_scatter_along(x, dim=SEQ_DIM, group=group)
    # [B, S, *] partial sums -> all_reduce(tp) -> [B, S, *] replicated; backward identity
    return all_reduce_sum(x, group=group)


class EnterParallelRegion(nn.Module):
    """Where an activation enters the tensor-parallel region (Megatron "f"); no parameters.

    Without SP: x [B, S, *] replicated -> the same tensor; backward sums the ranks' partial
    gradients over tp. With SP: x [B, S/tp, *] -> [B, S, *] all-gathered; backward reduce-scatters.
    """

    def __init__(self, *, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> None:
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _enter_region(x, self.tp_group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"tp={self.tp_group.size()}, sequence_parallel={self.sequence_parallel}"


class GatherSequence(nn.Module):
    """SP: x [B, S/tp, *] -> [B, S, *] replicated; backward keeps this rank's chunk of the full,
    tp-identical gradient (Megatron ``gather_from_sequence_parallel_region`` with
    ``tensor_parallel_output_grad=False``). For consumers that compute the same thing on every
    tp rank: the MoE, the hidden z-loss."""

    def __init__(self, *, tp_group: dist.ProcessGroup) -> None:
        super().__init__()
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_group(x, dim=SEQ_DIM, group=self.tp_group)


class ScatterSequence(nn.Module):
    """SP: x [B, S, *] replicated -> [B, S/tp, *], this rank's chunk; backward all-gathers the
    chunks' gradients (Megatron ``scatter_to_sequence_parallel_region``)."""

    def __init__(self, *, tp_group: dist.ProcessGroup) -> None:
        super().__init__()
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_to_group(x, dim=SEQ_DIM, group=self.tp_group)


# ------------------------------------------------------------------------------- layers


def _shard(param: torch.Tensor, *, dim: int, group: dist.ProcessGroup, memo: dict) -> nn.Parameter:
    """This rank's contiguous chunk of ``param`` along ``dim`` as a new Parameter; a parameter shared
    by two modules (tied embeddings) is sharded once and stays shared."""
    if id(param) in memo:
        shard, shard_dim = memo[id(param)]
        assert shard_dim == dim, "a tied parameter must be sharded the same way in every module"
        return shard
    assert param.shape[dim] % group.size() == 0, (tuple(param.shape), dim, group.size())
    local = param.detach().chunk(group.size(), dim=dim)[group.rank()].clone()
    shard = nn.Parameter(local, requires_grad=param.requires_grad)
    memo[id(param)] = (shard, dim)
    return shard


class _ShardRepr(nn.Module):
    """Mixed in before ``nn.Linear`` / ``nn.Embedding``: their repr plus the tp shard."""

    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    def extra_repr(self) -> str:
        tp, sp = self.tp_group.size(), self.sequence_parallel
        return f"{super().extra_repr()} (local shard), tp={tp}, sequence_parallel={sp}"


class ColumnParallelLinear(_ShardRepr, nn.Linear):
    """``y_BSF = x_BSD W^T (+ b)`` with the output features split over tp: weight [F/tp, D] holds
    rows ``[tp_rank * F/tp, (tp_rank + 1) * F/tp)`` of the full weight (bias likewise).

    Input: replicated [B, S, D] (SP: sequence shard [B, S/tp, D]); it enters the tensor-parallel
    region here unless ``input_is_parallel`` (the caller already did, once for several layers).
    Output: [B, S, F/tp], full sequence, local features. Build with ``from_linear``.
    """

    tp_group: dist.ProcessGroup
    sequence_parallel: bool
    input_is_parallel: bool

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, tp_group: dist.ProcessGroup, sequence_parallel: bool,
        input_is_parallel: bool = False, memo: Optional[dict] = None,
    ) -> ColumnParallelLinear:
        memo = {} if memo is None else memo
        module = cls(linear.in_features, linear.out_features // tp_group.size(), bias=linear.bias is not None,
                     device="meta")
        module.weight = _shard(linear.weight, dim=0, group=tp_group, memo=memo)
        if linear.bias is not None:
            module.bias = _shard(linear.bias, dim=0, group=tp_group, memo=memo)
        module.tp_group, module.sequence_parallel = tp_group, sequence_parallel
        module.input_is_parallel = input_is_parallel
        return module

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x_BSD = _enter_region(x_BSD, self.tp_group, self.sequence_parallel)
        return F.linear(x_BSD, self.weight, self.bias)


class RowParallelLinear(_ShardRepr, nn.Linear):
    """``y_BSD = x_BSF W^T (+ b)`` with the input features split over tp: weight [D, F/tp] holds
    columns ``[tp_rank * F/tp, (tp_rank + 1) * F/tp)``; the bias [D] is replicated.

    Input: [B, S, F/tp], local features (the output of column-parallel work). Output: replicated
    [B, S, D] (SP: [B, S/tp, D]); the partial products leave the region before the bias is added
    once. Build with ``from_linear``.
    """

    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, tp_group: dist.ProcessGroup, sequence_parallel: bool, memo: Optional[dict] = None
    ) -> RowParallelLinear:
        memo = {} if memo is None else memo
        module = cls(linear.in_features // tp_group.size(), linear.out_features, bias=linear.bias is not None,
                     device="meta")
        module.weight = _shard(linear.weight, dim=1, group=tp_group, memo=memo)
        if linear.bias is not None:
            module.bias = linear.bias  # replicated
        module.tp_group, module.sequence_parallel = tp_group, sequence_parallel
        return module

    def forward(self, x_BSF: torch.Tensor) -> torch.Tensor:
        out_BSD = _leave_region(F.linear(x_BSF, self.weight), self.tp_group, self.sequence_parallel)
        if self.bias is None:
            return out_BSD
        # Under SP each rank adds the bias to its own tokens only, so its grad is partial:
        # [D] bias -> identity; backward all_reduce(tp) -> [D] grad of every token
        bias_D = copy_to_group(self.bias, group=self.tp_group) if self.sequence_parallel else self.bias
        return out_BSD + bias_D


class VocabParallelEmbedding(_ShardRepr, nn.Embedding):
    """Embedding with the vocabulary split over tp: weight [V/tp, D] holds rows
    ``[vocab_start, vocab_start + V/tp)``, ``vocab_start = tp_rank * V/tp``.

    input_ids_BS [B, S] (every rank the same) -> [B, S, D] replicated (SP: [B, S/tp, D]). Each
    rank looks up the ids it owns and writes zeros elsewhere; the sum over tp is exact.

    Raises:
        ValueError (forward): under SP, S not divisible by tp.
    """

    tp_group: dist.ProcessGroup
    sequence_parallel: bool
    vocab_start: int

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, *, tp_group: dist.ProcessGroup, sequence_parallel: bool,
        memo: Optional[dict] = None,
    ) -> VocabParallelEmbedding:
        memo = {} if memo is None else memo
        assert embedding.padding_idx is None and embedding.max_norm is None, "not used by the model"
        local_rows = embedding.num_embeddings // tp_group.size()
        module = cls(local_rows, embedding.embedding_dim, device="meta")
        module.weight = _shard(embedding.weight, dim=0, group=tp_group, memo=memo)
        module.tp_group, module.sequence_parallel = tp_group, sequence_parallel
        module.vocab_start = tp_group.rank() * local_rows
        return module

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        size = self.tp_group.size()
        if self.sequence_parallel and input_ids_BS.shape[SEQ_DIM] % size:
            raise ValueError(
                f"sequence parallelism splits the sequence S={input_ids_BS.shape[SEQ_DIM]} over tp={size}: "
                f"choose a sequence length divisible by {size} (or pad to it)"
            )
        local_ids_BS = input_ids_BS - self.vocab_start
        foreign_BS = (local_ids_BS < 0) | (local_ids_BS >= self.num_embeddings)
        h_BSD = F.embedding(local_ids_BS.masked_fill(foreign_BS, 0), self.weight)
        h_BSD = h_BSD.masked_fill(foreign_BS.unsqueeze(-1), 0.0)
        return _leave_region(h_BSD, self.tp_group, self.sequence_parallel)


class SequenceParallelLinear(nn.Linear):
    """A replicated Linear applied to a sequence shard (SP): forward as ``nn.Linear``; its weight and
    bias pass through ``copy_to_group``, so their gradients are summed over tp (every token's
    contribution) and identical on every rank. Build with ``from_linear`` (shares the parameters)."""

    tp_group: dist.ProcessGroup

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, tp_group: dist.ProcessGroup) -> SequenceParallelLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias, module.tp_group = linear.weight, linear.bias, tp_group
        return module

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        # [out, in] weight (and [out] bias) -> identity; backward all_reduce(tp) of the shards' grads
        weight = copy_to_group(self.weight, group=self.tp_group)
        bias = None if self.bias is None else copy_to_group(self.bias, group=self.tp_group)
        return F.linear(x_BSD, weight, bias)


# ------------------------------------------------------------------------------- loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE from vocab-sharded logits (Megatron ``_VocabParallelCrossEntropy``)."""

    @staticmethod
    def forward(ctx, logits_TV: torch.Tensor, labels_T: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        V_local = logits_TV.shape[-1]
        max_T = logits_TV.max(dim=-1).values
        if group.size() > 1:
            # [T] local max -> all_reduce(max, tp) -> [T] global max (a shift only: no gradient)
            dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=group)
        shifted_TV = logits_TV - max_T[:, None]
        local_T = labels_T - group.rank() * V_local
        owned_T = (local_T >= 0) & (local_T < V_local)  # a negative ignore_index is owned by no rank
        local_T = local_T.masked_fill(~owned_T, 0)
        label_logit_T = shifted_TV.gather(1, local_T[:, None]).squeeze(1).masked_fill(~owned_T, 0.0)
        exp_TV = shifted_TV.exp_()
        sums_2T = torch.stack([exp_TV.sum(dim=-1), label_logit_T])
        if group.size() > 1:
            # [2, T] (sum of exp, label logit) over local vocab -> all_reduce(sum, tp) -> [2, T] global
            dist.all_reduce(sums_2T, group=group)
        sum_exp_T, label_logit_T = sums_2T.unbind(0)
        ctx.save_for_backward(exp_TV.div_(sum_exp_T[:, None]), local_T, owned_T)
        return sum_exp_T.log() - label_logit_T

    @staticmethod
    def backward(ctx, grad_T: torch.Tensor):
        softmax_TV, local_T, owned_T = ctx.saved_tensors
        # d CE / d logits = softmax - one_hot(label); the one-hot lives on the label's owner.
        grad_TV = softmax_TV * grad_T[:, None]
        grad_TV.scatter_add_(1, local_T[:, None], (-grad_T * owned_T)[:, None])
        return grad_TV, None, None


def vocab_parallel_cross_entropy_sum(
    logits_BSV_local: torch.Tensor, labels_BS: torch.Tensor, *, tp_group: dist.ProcessGroup, ignore_index: int = -100
) -> torch.Tensor:
    """Sum over labelled tokens of the cross-entropy, from vocab-sharded logits, in fp32.

    Equals ``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")`` of
    the gathered logits (Megatron-LM's vocab-parallel cross-entropy: max, sum of exponentials and the
    label's logit are reduced over tp; the full [B, S, V] logits never exist on one rank).

    Args:
        logits_BSV_local: [B, S, V/tp], this rank's vocab shard (rank r holds ids
            ``[r * V/tp, (r + 1) * V/tp)``), any float dtype.
        labels_BS: int64 [B, S] global token ids, ``ignore_index`` = no label; identical on every tp
            rank. Ids outside [0, V) are not checked (that would cost a host sync).
        tp_group: the group the vocabulary is split over.
        ignore_index: the label of unlabelled positions (negative: owned by no rank); torch's default.

    Returns:
        [] fp32, the same value on every tp rank; its backward gives each rank the gradient of its
        own logits shard (no further reduction).
    """
    labels_T = labels_BS.reshape(-1)
    loss_T = _VocabParallelCrossEntropy.apply(logits_BSV_local.float().flatten(0, 1), labels_T, tp_group)
    return torch.where(labels_T != ignore_index, loss_T, 0.0).sum()


# ------------------------------------------------------------------------------- global layout


class TPShard(NamedTuple):
    """A local parameter as a piece of the global one: ``global.narrow(shard_dim, offset, local
    size)``, or the whole tensor when ``shard_dim`` is None (replicated over tp)."""

    global_shape: tuple[int, ...]
    shard_dim: Optional[int]
    offset: int


def describe_tp_shards(model: nn.Module, *, tp_group: dist.ProcessGroup,
                       skip_modules: tuple[type[nn.Module], ...] = ()) -> dict[str, TPShard]:
    """Every parameter of ``model`` (``named_parameters`` names, tied ones once) -> its place in the
    global tensor over ``tp_group``: the parallel layers' shards, everything else replicated.

    Call on the unwrapped model; valid before any layer is swapped too (everything replicated).
    ``skip_modules``: module types whose parameters are left out (described by another plan, e.g.
    expert weights sharded over ep).
    """
    size, rank = tp_group.size(), tp_group.rank()
    shard_dims: dict[int, int] = {}
    skipped: set[int] = set()
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            shard_dims.update({id(p): 0 for p in module.parameters(recurse=False)})
        elif isinstance(module, RowParallelLinear):
            shard_dims[id(module.weight)] = 1
        elif skip_modules and isinstance(module, skip_modules):
            skipped.update(id(p) for p in module.parameters())
    info = {}
    for name, param in model.named_parameters():
        if id(param) in skipped:
            continue
        dim = shard_dims.get(id(param))
        shape = tuple(param.shape)
        if dim is None:
            info[name] = TPShard(shape, None, 0)
        else:
            global_shape = shape[:dim] + (shape[dim] * size,) + shape[dim + 1:]
            info[name] = TPShard(global_shape, dim, rank * shape[dim])
    return info


@torch.no_grad()
def gather_tp_tensors(
    tensors: Mapping[str, torch.Tensor], info: Mapping[str, TPShard], *, tp_group: dist.ProcessGroup
) -> dict[str, torch.Tensor]:
    """Full global tensors from local shards (parameters, their grads or optimizer states).

    Collective over ``tp_group``: every rank passes the same names in the same order.

    Args:
        tensors: name -> local tensor shaped like the parameter of that name.
        info: from ``describe_tp_shards``.

    Returns:
        name -> the global tensor (replicated entries are returned as they are).
    """
    full = {}
    for name, local in tensors.items():
        dim = info[name].shard_dim
        # local shard -> all_gather(tp, along shard_dim) -> global tensor, rank order
        full[name] = local if dim is None else all_gather_along(local, dim=dim, group=tp_group)
        assert tuple(full[name].shape) == info[name].global_shape, (name, full[name].shape)
    return full
