"""Fused LM head + cross-entropy: the summed token loss straight from the hidden states, vocab-parallel
under TP, without ever holding the [T, V] logits (or their gradient) of the micro-batch.

    loss = sum_{t labelled} logsumexp_v(h_t W_v) - h_t W_{label_t}          (fp32 [])

The rows are taken ``chunk_rows`` at a time: a chunk's logits ``[c, V/tp]`` are formed by one GEMM in
the compute dtype (autocast's, else the inputs'), and their fp32 log-sum-exp and label logit give the
chunk's loss. The gradient ``g = softmax - onehot`` of a chunk gives its share of both gradients,
``dh_c = g_c W`` and ``dW += g_c^T h_c``, at one of two times (``grads_in_forward``):

- in forward (Liger-Kernel's "fused linear cross-entropy" scheme), when the micro-batch has at least D
  tokens: backward then only scales the two by the incoming gradient (the loss is a sum, so that
  gradient is a scalar). Three GEMMs, the unfused head's FLOPs; held from forward to backward: ``dh``
  [T, D] and an fp32 ``dW`` [V/tp, D] (the weight's size, no bigger than one fp32 [T, V/tp] logits;
  backward's scaled copy is a second one while it runs, like the parameter's gradient it becomes).
- in backward, from the chunk's logits computed again: four GEMMs; held from forward to backward: the
  compute-dtype input [T, D] and the fp32 log-sum-exp [T] (backward then forms the fp32 ``dW`` and,
  under autocast, a compute-dtype copy of the weight while it runs). For few tokens per micro-batch
  and a large vocabulary (LongCat-Flash under CP: 1024 tokens, D = 6144, V = 131k).

A pipeline stage with this head keeps its backward whole (no zero-bubble input / weight split: the one
node would run twice).

Either way the [T, V/tp] logits and their gradient never exist whole; at LongCat-Flash's 131k
vocabulary they are the largest activation of the step.

Under tensor parallelism the weight is this rank's vocab shard (rows ``[r V/tp, (r + 1) V/tp)``) and
the hidden state the full (tp-replicated) one: per chunk one all-gather of ``[2, c]`` fp32 (the
shard's log-sum-exp and label logit) gives the global log-sum-exp (combined in rank order, so every
rank has the same bits) and label logit; ``dh`` is then this shard's partial sum, completed by the
backward of the region the hidden state entered through (``lm_head_cross_entropy_sum`` does that
entry, as ``ColumnParallelLinear.forward`` would).

Shape legend:
    B  batch
    S  sequence
    T  B * S tokens (flattened)
    D  hidden_size
    V  vocab_size (V/tp per rank in a vocab shard)
    c  rows of one chunk
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from longcat.distributed.collectives import all_gather_along
from longcat.distributed.tensor_parallel import ColumnParallelLinear, enter_parallel_region

__all__ = ["ACCELERATOR_CHUNK_BYTES", "CPU_CHUNK_BYTES", "chunk_rows_for", "grads_in_forward",
           "linear_cross_entropy_sum", "lm_head_cross_entropy_sum"]

# A chunk's fp32 logits take about this many bytes. CPU: cache-sized; measured on the small preset's head
# (T = 2048, D = 512, V = 8192, one thread), 256 rows were as fast as the unfused GEMM, 128 and 512
# slower. Accelerators: GEMM-sized, so that every chunk's GEMMs are compute-bound rather than a pass
# over the whole weight for a few rows (>= 512 rows at a 131k vocabulary; not measured: no GPU here).
CPU_CHUNK_BYTES = 8 << 20
ACCELERATOR_CHUNK_BYTES = 256 << 20
MIN_CPU_CHUNK_ROWS = 16
MIN_ACCELERATOR_CHUNK_ROWS = 512


def chunk_rows_for(vocab_local: int, *, device_type: str = "cpu") -> int:
    """Rows per chunk so that a chunk's fp32 logits [c, V_local] take ``CPU_CHUNK_BYTES`` on the CPU
    (at least 16 rows) or ``ACCELERATOR_CHUNK_BYTES`` elsewhere (at least 512 rows)."""
    if device_type == "cpu":
        return max(MIN_CPU_CHUNK_ROWS, CPU_CHUNK_BYTES // (4 * max(vocab_local, 1)))
    return max(MIN_ACCELERATOR_CHUNK_ROWS, ACCELERATOR_CHUNK_BYTES // (4 * max(vocab_local, 1)))


def grads_in_forward(num_tokens: int, hidden_size: int) -> bool:
    """Whether the fused head forms its gradients in forward (Liger's scheme, three GEMMs) rather than
    recomputing the logits in backward (four GEMMs): only when its fp32 weight-gradient buffer
    [V/tp, D] is no bigger than one fp32 logits matrix [T, V/tp] of the micro-batch, i.e. T >= D. The
    small preset (T = 2048 >= D = 512) computes in forward; LongCat-Flash under CP (T = 8192 / 8 = 1024
    local tokens < D = 6144) recomputes, one more head GEMM (about 1% of its step's FLOPs) instead of
    3 GiB held per head at V = 131k."""
    return num_tokens >= hidden_size


class _Rows(NamedTuple):
    """Per-row label bookkeeping: labelled [T] bool, local label index [T] (0 where not owned), owned [T]
    bool (the label lies in this rank's vocab shard)."""

    labelled_T: torch.Tensor
    local_T: torch.Tensor
    owned_T: torch.Tensor


def _rows(labels_T: torch.Tensor, *, ignore_index: int, rank: int, vocab_local: int) -> _Rows:
    labelled_T = labels_T != ignore_index
    local_T = labels_T - rank * vocab_local
    owned_T = labelled_T & (local_T >= 0) & (local_T < vocab_local)  # tp = 1: every labelled row
    return _Rows(labelled_T, local_T.masked_fill(~owned_T, 0), owned_T)


def _chunk_grads(logits_cV: torch.Tensor, lse_c: torch.Tensor, rows: _Rows, chunk: slice, *,
                 scale: Optional[torch.Tensor], x_TD: torch.Tensor, w_VD: torch.Tensor,
                 dh_TD: Optional[torch.Tensor], dw_VD: Optional[torch.Tensor]) -> None:
    """One chunk's share of both gradients from its fp32 logits (overwritten): ``g = (softmax - onehot)``
    on labelled rows (times ``scale``), ``dh[chunk] = g W`` and ``dW += g^T x[chunk]`` (fp32)."""
    g_cV = logits_cV.sub_(lse_c[:, None]).exp_()
    g_cV.scatter_add_(1, rows.local_T[chunk, None], -rows.owned_T[chunk, None].to(torch.float32))
    g_cV.mul_(rows.labelled_T[chunk, None])
    if scale is not None:
        g_cV.mul_(scale)
    g_cV = g_cV.to(x_TD.dtype)
    if dh_TD is not None:
        torch.mm(g_cV, w_VD, out=dh_TD[chunk])
    if dw_VD is not None:
        if x_TD.dtype == torch.float32:
            dw_VD.addmm_(g_cV.t(), x_TD[chunk])
        else:
            dw_VD.add_(torch.mm(g_cV.t(), x_TD[chunk]))  # in place: no fp32 copy of the chunk's product


class _LinearCrossEntropySum(torch.autograd.Function):
    """See the module docstring. Inputs: h_TD, weight_VD (the parameter), labels_T; ``in_forward``:
    ``grads_in_forward``'s choice."""

    @staticmethod
    def forward(ctx, h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor,
                tp_group: Optional[dist.ProcessGroup], chunk_rows: int, compute_dtype: torch.dtype,
                ignore_index: int, grad_h: bool, grad_weight: bool, in_forward: bool) -> torch.Tensor:
        T = h_TD.shape[0]
        vocab_group = tp_group if tp_group is not None and tp_group.size() > 1 else None
        rank = 0 if tp_group is None else tp_group.rank()
        eager = in_forward and (grad_h or grad_weight)
        with torch.autocast(h_TD.device.type, enabled=False):
            x_TD = h_TD.to(compute_dtype)
            w_VD = weight_VD.to(compute_dtype)
            rows = _rows(labels_T, ignore_index=ignore_index, rank=rank, vocab_local=weight_VD.shape[0])
            dh_TD = torch.empty_like(x_TD) if eager and grad_h else None
            dw_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) \
                if eager and grad_weight else None
            lse_T = torch.empty(T, dtype=torch.float32, device=h_TD.device)
            loss = torch.zeros((), dtype=torch.float32, device=h_TD.device)
            for start in range(0, T, chunk_rows):
                chunk = slice(start, start + chunk_rows)
                logits_cV = F.linear(x_TD[chunk], w_VD).float()
                lse_c = torch.logsumexp(logits_cV, dim=-1)
                label_logit_c = logits_cV.gather(1, rows.local_T[chunk, None]).squeeze(1)
                label_logit_c = label_logit_c.masked_fill(~rows.owned_T[chunk], 0.0)
                if vocab_group is not None:
                    # [1, 2, c] (shard's log-sum-exp, label logit or 0) -> all_gather(tp) -> [tp, 2, c]
                    stats_G2c = all_gather_along(torch.stack([lse_c, label_logit_c])[None], dim=0,
                                                 group=vocab_group)
                    lse_c = torch.logsumexp(stats_G2c[:, 0], dim=0)  # rank order: the same bits on every rank
                    label_logit_c = stats_G2c[:, 1].sum(0)  # one owner, zeros elsewhere: exact
                lse_T[chunk] = lse_c
                loss += torch.where(rows.labelled_T[chunk], lse_c - label_logit_c, 0.0).sum()
                if eager:
                    _chunk_grads(logits_cV, lse_c, rows, chunk, scale=None, x_TD=x_TD, w_VD=w_VD, dh_TD=dh_TD,
                                 dw_VD=dw_VD)
        ctx.eager = eager
        ctx.h_dtype, ctx.weight_dtype, ctx.compute_dtype = h_TD.dtype, weight_VD.dtype, compute_dtype
        ctx.chunk_rows, ctx.ignore_index, ctx.rank = chunk_rows, ignore_index, rank
        ctx.grad_h, ctx.grad_weight = grad_h, grad_weight
        if eager:
            ctx.save_for_backward(dh_TD, dw_VD)
        else:  # recompute: keep the compute-dtype input (h itself without autocast), the weight and lse
            ctx.save_for_backward(x_TD, weight_VD, labels_T, lse_T)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.eager:
            dh_TD, dw_VD = ctx.saved_tensors
            grad_h_TD = None if dh_TD is None else (dh_TD.float() * grad_loss).to(ctx.h_dtype)
            grad_w_VD = None if dw_VD is None else (dw_VD * grad_loss).to(ctx.weight_dtype)
            return grad_h_TD, grad_w_VD, None, None, None, None, None, None, None, None
        x_TD, weight_VD, labels_T, lse_T = ctx.saved_tensors
        with torch.autocast(x_TD.device.type, enabled=False):
            w_VD = weight_VD.to(ctx.compute_dtype)
            rows = _rows(labels_T, ignore_index=ctx.ignore_index, rank=ctx.rank, vocab_local=weight_VD.shape[0])
            dh_TD = torch.empty_like(x_TD) if ctx.grad_h else None
            dw_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) \
                if ctx.grad_weight else None
            scale = grad_loss.float()
            for start in range(0, x_TD.shape[0], ctx.chunk_rows):
                chunk = slice(start, start + ctx.chunk_rows)
                logits_cV = F.linear(x_TD[chunk], w_VD).float()
                _chunk_grads(logits_cV, lse_T[chunk], rows, chunk, scale=scale, x_TD=x_TD, w_VD=w_VD,
                             dh_TD=dh_TD, dw_VD=dw_VD)
        grad_h_TD = None if dh_TD is None else dh_TD.to(ctx.h_dtype)
        grad_w_VD = None if dw_VD is None else dw_VD.to(ctx.weight_dtype)
        return grad_h_TD, grad_w_VD, None, None, None, None, None, None, None, None


def linear_cross_entropy_sum(hidden_BSD: torch.Tensor, weight_VD: torch.Tensor, labels_BS: torch.Tensor, *,
                             tp_group: Optional[dist.ProcessGroup] = None, chunk_rows: int = 0,
                             ignore_index: int = -100, in_forward: Optional[bool] = None) -> torch.Tensor:
    """Sum over labelled tokens of ``cross_entropy(hidden @ weight^T, labels)``, fp32, the logits never
    held whole (see the module docstring).

    Equals ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")`` (with the
    weight gathered over tp) to rounding: the logits are formed in the same compute dtype (autocast's
    when it is on for the hidden state's device, else the inputs'), the log-sum-exp in fp32; the sums
    over rows (and, for the weight's gradient, over tokens) are taken chunk by chunk.

    Args:
        hidden_BSD: [B, S, D] (or [T, D]) final hidden states, full over tp (already inside the
            tensor-parallel region: its backward completes the partial gradient over tp).
        weight_VD: [V, D] LM head weight, or [V/tp, D] this tp rank's contiguous vocab shard.
        labels_BS: int64 [B, S] (or [T]) global token ids, ``ignore_index`` = no label; identical on
            every tp rank. Ids outside [0, V) are not checked (that would cost a host sync).
        tp_group: the group the vocabulary is split over; None (or size 1): the whole vocabulary.
        chunk_rows: rows per chunk; 0 = ``chunk_rows_for(V/tp, device_type=<the hidden state's>)``.
        ignore_index: the label of unlabelled positions.
        in_forward: form the gradients in forward (True) or recompute the logits in backward (False);
            None = ``grads_in_forward(T, D)``.

    Returns:
        [] fp32, the same value on every tp rank; its backward gives the hidden state this shard's
        partial gradient and the weight its own shard's gradient.

    Raises:
        ValueError: mismatched shapes, or hidden and weight of different dtypes outside autocast.
    """
    h_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
    labels_T = labels_BS.reshape(-1)
    if weight_VD.ndim != 2 or weight_VD.shape[1] != h_TD.shape[1] or labels_T.shape[0] != h_TD.shape[0]:
        raise ValueError(f"linear_cross_entropy_sum: hidden {tuple(hidden_BSD.shape)}, weight "
                         f"{tuple(weight_VD.shape)} and labels {tuple(labels_BS.shape)} do not match "
                         "([..., D], [V, D], [...] with the same leading dims)")
    device_type = h_TD.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif h_TD.dtype != weight_VD.dtype:
        raise ValueError(f"linear_cross_entropy_sum: hidden {h_TD.dtype} and weight {weight_VD.dtype} differ "
                         "outside autocast; cast one of them (as F.linear would require)")
    else:
        compute_dtype = h_TD.dtype
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive (or 0 for the default)")
    chunk_rows = chunk_rows or chunk_rows_for(weight_VD.shape[0], device_type=device_type)
    if in_forward is None:
        in_forward = grads_in_forward(h_TD.shape[0], h_TD.shape[1])
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropySum.apply(
        h_TD.contiguous(), weight_VD, labels_T, tp_group, chunk_rows, compute_dtype, ignore_index,
        grad_enabled and h_TD.requires_grad, grad_enabled and weight_VD.requires_grad, in_forward)


def lm_head_cross_entropy_sum(lm_head: nn.Linear, hidden_BSD: torch.Tensor, labels_BS: torch.Tensor, *,
                              ignore_index: int = -100) -> torch.Tensor:
    """``linear_cross_entropy_sum`` of an LM head module: a plain ``nn.Linear`` [V, D], or a
    ``ColumnParallelLinear`` vocab shard [V/tp, D], whose input enters the tensor-parallel region here
    as in its forward (SP: the sequence shard [B, S/tp, D] is all-gathered first).

    Call it inside the forward of the module that owns ``lm_head`` (the model, a pipeline stage), so
    that a wrapper gathering parameters in its forward hooks (FSDP2) has them gathered.

    Returns: [] fp32. Raises: ValueError for an LM head with a bias (LongCat-Flash's has none).
    """
    if lm_head.bias is not None:
        raise ValueError("lm_head_cross_entropy_sum: the LM head has a bias; the fused loss supports "
                         "bias-free heads only (set loss.lm_head_ce=logits)")
    tp_group = None
    if isinstance(lm_head, ColumnParallelLinear):
        tp_group = lm_head.tp_group
        if not lm_head.input_is_parallel:
            hidden_BSD = enter_parallel_region(hidden_BSD, group=tp_group, sequence_parallel=lm_head.sequence_parallel)
    return linear_cross_entropy_sum(hidden_BSD, lm_head.weight, labels_BS, tp_group=tp_group, ignore_index=ignore_index)
