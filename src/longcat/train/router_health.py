"""Router health: the gradient-norm ratio R_g (arXiv 2509.01322 §3.1.3, Eq. 9) and router-weight similarity.

R_g compares, per MoE layer, how hard the load-balance loss pushes the router's probabilities with how
hard the language-modelling loss does:

    R_g = || alpha * dL_LB / dP || / || dL_LM / dP ||

P is the batch-averaged expert-probability vector [E]. We take the gradient with respect to P as the
sum over the micro-batch's tokens of the per-token gradients at the router probabilities
``probs_TE`` (the gradient of a shift of every token's probabilities by the same vector, which is what
moves P), for both losses, through autograd. L_LM is everything but the load-balance term (CE, MTP,
hidden z-loss). Since P is a probability vector, the trainer compares the gradients' simplex-tangent
parts (``simplex_tangent``: the component along the all-ones vector moves no softmax). The paper
keeps R_g < 0.1; ``suggest_lb_coef`` scales alpha down when it is above.

The mean pairwise cosine similarity of the router's weight rows warns of router collapse (experts'
routing vectors converging): logged, with a warning above ``collapse_threshold``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def grad_wrt_mean_probs(loss: torch.Tensor, probs_LTE: Sequence[torch.Tensor], *,
                        token_masks_LT: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """Per layer, the gradient of ``loss`` with respect to P: sum over tokens of dloss/dprobs_TE. [E] each.

    Args:
        probs_LTE: per layer the router's full softmax [T, E] (with grad, part of ``loss``'s graph).
        token_masks_LT: per layer a bool [T] (True = real token) or None; the sum then runs over the
            real tokens only (padding is no part of P).
    Returns:
        Per layer an fp32 [E] tensor (zeros where ``loss`` does not depend on that layer). The graph is
        retained (the caller still runs the real backward).
    """
    grads = torch.autograd.grad(loss, list(probs_LTE), retain_graph=True, allow_unused=True)
    masks = list(token_masks_LT) if token_masks_LT is not None else [None] * len(grads)
    out = []
    for g, p, mask_T in zip(grads, probs_LTE, masks):
        if g is None:
            out.append(p.new_zeros(p.shape[-1], dtype=torch.float32))  # on p's device
            continue
        g_TE = g.detach().float()
        if mask_T is not None:
            g_TE = g_TE * mask_T.to(g_TE.dtype)[:, None]
        out.append(g_TE.sum(0))
    return out


def simplex_tangent(grad_E: torch.Tensor) -> torch.Tensor:
    """``grad_E`` minus its mean: the part of a gradient with respect to P that can move P.

    P lies on the probability simplex (its entries sum to 1, a softmax), so a shift along the
    all-ones vector changes nothing; Eq. 3's gradient always has a large such component (every
    ``f_j > 0``), which would keep R_g high even at perfect balance.
    """
    return grad_E - grad_E.mean(dim=-1, keepdim=True)


def gradient_norm_ratio(lb_grad_E: torch.Tensor, lm_grad_E: torch.Tensor, *, tangent: bool = False) -> float:
    """R_g of Eq. 9 from the two gradients with respect to P (alpha already inside ``lb_grad_E``).

    ``tangent``: compare the simplex-tangent parts (``simplex_tangent``) of both gradients.
    """
    if tangent:
        lb_grad_E, lm_grad_E = simplex_tangent(lb_grad_E), simplex_tangent(lm_grad_E)
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
