"""Router health: the gradient-norm ratio R_g (PAPER.md §3.1.3, Eq. 9) and router-weight similarity.

R_g compares, per MoE layer, how hard the load-balance loss pushes the router's probabilities with how
hard the language-modelling loss does:

    R_g = || alpha * dL_LB / dP || / || dL_LM / dP ||

P is the batch-averaged expert-probability vector [E]. We take the gradient with respect to P as the
sum over the micro-batch's tokens of the per-token gradients at the router probabilities
``probs_TE`` (the gradient of a shift of every token's probabilities by the same vector, which is what
moves P), for both losses, through autograd. L_LM is everything but the load-balance term (CE, MTP,
hidden z-loss). The paper keeps R_g < 0.1; ``suggest_lb_coef`` scales alpha down when it is above.

The mean pairwise cosine similarity of the router's weight rows warns of router collapse (experts'
routing vectors converging): logged, with a warning above ``collapse_threshold``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def grad_wrt_mean_probs(loss: torch.Tensor, probs_LTE: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the gradient of ``loss`` with respect to P: sum over tokens of dloss/dprobs_TE. [E] each.

    The graph is retained (the caller still runs the real backward).
    """
    grads = torch.autograd.grad(loss, list(probs_LTE), retain_graph=True, allow_unused=True)
    return [torch.zeros(p.shape[-1]) if g is None else g.detach().float().sum(0) for g, p in zip(grads, probs_LTE)]


def gradient_norm_ratio(lb_grad_E: torch.Tensor, lm_grad_E: torch.Tensor) -> float:
    """R_g of Eq. 9 from the two gradients with respect to P (alpha already inside ``lb_grad_E``)."""
    lm = lm_grad_E.norm().item()
    return float("inf") if lm == 0 else lb_grad_E.norm().item() / lm


def suggest_lb_coef(alpha: float, ratios: Sequence[float], *, threshold: float, min_coef: float = 1e-6) -> float:
    """The automatic alpha: scaled so that the largest per-layer R_g sits at ``threshold`` when above it.

    R_g is linear in alpha, so alpha * threshold / max(R_g) puts the worst layer on the threshold; alpha
    never grows back above the configured value (the caller passes that as the ceiling through alpha).
    """
    worst = max((r for r in ratios if r == r and r != float("inf")), default=0.0)
    if worst <= threshold or worst == 0:
        return alpha
    return max(min_coef, alpha * threshold / worst)


def router_cosine_similarity(weight_EH: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the router classifier's rows (off-diagonal pairs only)."""
    w = F.normalize(weight_EH.detach().float(), dim=-1)
    sim_EE = w @ w.T
    e = sim_EE.shape[0]
    if e < 2:
        return 0.0
    return float((sim_EE.sum() - sim_EE.diagonal().sum()) / (e * (e - 1)))
