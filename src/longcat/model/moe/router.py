"""Top-K router with zero-computation experts and an expert bias (arXiv 2509.01322 §2.1, Eq. 1-2).

    logits = u W^T (fp32)          probs = softmax(logits) over all N + Z experts
    ids    = top-K(probs + b)      (b: e_score_correction_bias, used for selection only)
    gates  = probs[ids] * routed_scaling_factor   (unbiased, no renormalisation)

Shape legend:
    T  tokens (batch x sequence, flattened)
    D  hidden_size
    E  N + Z router width (FFN experts, then zero experts: ids >= N are zero experts)
    K  moe_topk
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """probs_TE: fp32 softmax over all E experts, with grad (load-balance loss, Eq. 3-5).
    expert_ids_TK: int64 global expert ids, ordered by biased score (ties: lower id first).
    gates_TK: fp32 ``probs[ids] * routed_scaling_factor``, with grad."""

    probs_TE: torch.Tensor
    expert_ids_TK: torch.Tensor
    gates_TK: torch.Tensor


class TopKRouter(nn.Module):
    """The ``mlp.router`` of a layer: ``classifier`` (Linear D -> E, no bias) and the persistent fp32
    buffer ``e_score_correction_bias`` [E] (updated by the budget controller, Eq. 2, never by grads).

    Args:
        hidden_size: D.
        num_experts: E = N + Z.
        top_k: K.
        routed_scaling_factor: gate multiplier (released: 6.0).
    """

    def __init__(self, hidden_size: int, *, num_experts: int, top_k: int, routed_scaling_factor: float) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.classifier = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` would round the expert bias; keep it fp32 on the new device.
        bias_E = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved_E = self.e_score_correction_bias
        if moved_E.dtype != torch.float32:
            self.e_score_correction_bias = bias_E.to(device=moved_E.device, dtype=torch.float32)
        return self

    def forward(self, u_TD: torch.Tensor) -> RouterOutput:
        """u_TD [T, D] (any float dtype) -> RouterOutput; all routing math in fp32, also under autocast
        (``train.bf16``), which would otherwise run the classifier's GEMM, and so the logits, the
        probabilities, the top-K and the gates, in bf16."""
        with torch.autocast(u_TD.device.type, enabled=False):
            logits_TE = F.linear(u_TD.float(), self.classifier.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK = self.select(probs_TE.detach())
        gates_TK = probs_TE.gather(1, expert_ids_TK) * self.routed_scaling_factor
        return RouterOutput(probs_TE=probs_TE, expert_ids_TK=expert_ids_TK, gates_TK=gates_TK)

    @torch.no_grad()
    def select(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """Deterministic top-K of ``probs + bias`` (fp32): the first K of a stable descending sort, so equal
        scores pick the lower expert id (torch.topk leaves tie order unspecified), computed as
        ``torch.topk`` of unique int64 keys (``tie_broken_keys``; 2-3x faster than the sort on the CPU at
        96-192 experts). Returns int64 [T, K]."""
        scores_TE = probs_TE + self.e_score_correction_bias
        return torch.topk(tie_broken_keys(scores_TE), self.top_k, dim=-1, sorted=True).indices

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, routed_scaling_factor={self.routed_scaling_factor}"


def tie_broken_keys(scores_TE: torch.Tensor) -> torch.Tensor:
    """fp32 [T, E] -> int64 [T, E] keys, unique per row, ordered as a stable descending sort orders the
    scores: the high 32 bits are the score's bits mapped to an order-preserving integer (-0.0 as +0.0,
    every NaN above +inf, as ``torch.sort`` places NaN), the low 32 bits ``E - 1 - id``, so of equal
    scores the lower expert id has the larger key.

    Raises:
        TypeError: scores are not fp32.
    """
    if scores_TE.dtype != torch.float32:
        raise TypeError(f"tie_broken_keys takes fp32 scores, got {scores_TE.dtype}")
    E = scores_TE.shape[-1]
    bits_TE = (scores_TE + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
    bits_TE = torch.where(bits_TE < 0, bits_TE ^ 0x7FFFFFFF, bits_TE)  # negative floats: larger value, larger int
    bits_TE = bits_TE.masked_fill_(torch.isnan(scores_TE), 2**31 - 1)  # above +inf (0x7F800000)
    return (bits_TE << 32) | (E - 1 - torch.arange(E, device=scores_TE.device))
