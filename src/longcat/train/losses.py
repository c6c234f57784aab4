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
import torch.nn.functional as F

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


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of token cross-entropy over labelled positions, computed in fp32. Returns []."""
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


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
