"""Training losses, each normalised so that any split of the global batch gives the same objective.

Shapes: B micro-batch size, S sequence length, V vocabulary, D hidden size, E = N + Z experts
(N FFN experts, Z zero-computation experts).

Normalisation (docs/architecture.md): cross-entropy, MTP and hidden z-loss are sums over the
micro-batch divided by global-batch counts (all micro-batches, all DP ranks) that the trainer computes
before the first forward, so a split into micro-batches holding 2, 5, 9 and 16 labelled tokens gives
the loss and gradients of the unsplit batch. The load-balance loss is defined per micro-batch (Eq. 3-5,
T = its real tokens) and averaged over the micro-batches of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat.data.samples import (
    IGNORE_INDEX,  # the data's label of "no target"; one definition
)

__all__ = ["IGNORE_INDEX", "GlobalTokenCounts", "cross_entropy_sum", "hidden_z_loss_sum", "load_balance_loss",
           "mtp_labels"]


@dataclass(frozen=True)
class GlobalTokenCounts:
    """Token counts of the whole global batch (summed over micro-batches and DP ranks)."""

    num_labels: float  # tokens with a label (labels != -100)
    num_mtp_labels: float  # tokens with an MTP label (the label one further ahead)
    num_real: float  # non-padding tokens (labelled or not)


def mtp_labels(labels_BS: torch.Tensor) -> torch.Tensor:
    """MTP targets: position t predicts token t+2, i.e. ``labels[t+1]``; the last position has none.

    Returns: [B, S] int64 with -100 where no target exists.
    """
    shifted = torch.full_like(labels_BS, IGNORE_INDEX)
    shifted[:, :-1] = labels_BS[:, 1:]
    return shifted


# Rows of logits per chunk of the fused cross-entropy: [64, V] fp32 temporaries (2 MiB at V = 8192)
# stay in a core's cache between the passes over them.
CE_CHUNK_ROWS = 64


class _CrossEntropySum(torch.autograd.Function):
    """Summed token cross-entropy over labelled rows, fp32, in row chunks (see ``cross_entropy_sum``).

    Forward keeps per row only the fp32 log-sum-exp [N]; backward writes
    ``softmax(x) - onehot(label)`` (times the incoming gradient, 0 on unlabelled rows) chunk by chunk
    into the logits' gradient, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        N = logits_NV.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        for start in range(0, N, chunk_rows):
            torch.logsumexp(logits_NV[start:start + chunk_rows].float(), dim=-1, out=lse_N[start:start + chunk_rows])
        labelled_N = labels_N != IGNORE_INDEX
        safe_labels_N = torch.where(labelled_N, labels_N, 0)
        target_N = logits_NV.gather(1, safe_labels_N[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits_NV, lse_N, safe_labels_N, labelled_N)
        ctx.chunk_rows = chunk_rows
        return torch.where(labelled_N, lse_N - target_N, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits_NV, lse_N, labels_N, labelled_N = ctx.saved_tensors
        scale_N = labelled_N.to(torch.float32) * grad_loss.float()
        grad_NV = torch.empty_like(logits_NV)
        for start in range(0, logits_NV.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            p_cV = (logits_NV[rows].float() - lse_N[rows, None]).exp_()
            p_cV.scatter_add_(1, labels_N[rows, None], p_cV.new_full((p_cV.shape[0], 1), -1.0))
            grad_NV[rows] = p_cV.mul_(scale_N[rows, None])
        return grad_NV, None, None


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, *,
                      chunk_rows: int = CE_CHUNK_ROWS) -> torch.Tensor:
    """Sum (not mean) of token cross-entropy over labelled positions (``labels != IGNORE_INDEX``),
    computed in fp32. Returns [].

    ``F.cross_entropy(logits.float(), labels, reduction="sum")`` to rounding (its log-sum-exp and sum
    orders differ in the last bits), without its [B*S, V] intermediates: the fp32 copy of bf16 logits,
    the log-probabilities saved for backward and the zero-filled gradient of the gather exist only
    ``chunk_rows`` rows at a time. What stays for backward is the logits themselves (alive anyway)
    and an fp32 log-sum-exp per position.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    logits_NV = logits_BSV.flatten(0, 1)
    if not logits_NV.is_contiguous():
        logits_NV = logits_NV.contiguous()
    return _CrossEntropySum.apply(logits_NV, labels_BS.flatten(), chunk_rows)


def hidden_z_loss_sum(hidden_BSD: torch.Tensor, token_mask_BS: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of ``(logsumexp_i |z_t,i|)^2`` (arXiv 2509.01322 Eq. 10, before lambda / T).

    ``hidden_BSD`` is the last layer's output before the final norm. Returns [] fp32.
    """
    lse_BS = torch.logsumexp(hidden_BSD.float().abs(), dim=-1)
    return (lse_BS.square() * token_mask_BS).sum()


def load_balance_loss(expert_counts_E: torch.Tensor, prob_sum_E: torch.Tensor, num_tokens: torch.Tensor, *,
                      n_routed_experts: int, moe_topk: int, expected_ffn_experts: float,
                      num_groups: int) -> torch.Tensor:
    """Device-level load-balance loss of one MoE layer and one micro-batch, without alpha (Eq. 3-5).

    The N FFN experts split into ``num_groups`` (D) contiguous groups (one per EP rank); all zero experts
    form group D+1. ``f_j = D/(K_e T) * assignments_j`` for FFN groups,
    ``f_{D+1} = assignments_zero / ((K - K_e) T)``, ``P_j = (1/T) sum_{i in j} sum_t p_t,i``; returns
    ``sum_j f_j P_j`` (a [] tensor whose gradient reaches the router through ``prob_sum_E``).

    Args:
        expert_counts_E: [E] assignments of this micro-batch's real tokens (no grad).
        prob_sum_E: [E] sum over real tokens of the full softmax probabilities (with grad).
        num_tokens: [] real tokens T of the micro-batch.
    """
    if n_routed_experts % num_groups:
        raise ValueError(f"n_routed_experts={n_routed_experts} is not divisible by num_groups={num_groups}")
    tokens = num_tokens.clamp(min=1.0)
    counts_GE = expert_counts_E[:n_routed_experts].reshape(num_groups, -1)
    probs_GE = prob_sum_E[:n_routed_experts].reshape(num_groups, -1)
    f_G = counts_GE.sum(-1) * (num_groups / (expected_ffn_experts * tokens))
    loss = (f_G * probs_GE.sum(-1) / tokens).sum()
    num_zero_slots = moe_topk - expected_ffn_experts
    if expert_counts_E.numel() > n_routed_experts and num_zero_slots > 0:
        f_zero = expert_counts_E[n_routed_experts:].sum() / (num_zero_slots * tokens)
        loss = loss + f_zero * prob_sum_E[n_routed_experts:].sum() / tokens
    return loss * (num_tokens > 0)
