"""The MoE block ``mlp`` of a decoder layer: router -> token dispatcher -> experts -> combine
(PAPER.md §2.1, Eq. 1).

    MoE(u_t) = sum_{i in topK} g_i * E_i(u_t),   E_i(u) = u for a zero expert (id >= N)

Router statistics are *returned* (``MoEStats``), never stored on the module, so recomputation under
activation checkpointing cannot count a micro-batch twice.

Shape legend:
    B  batch
    S  sequence
    T  B * S tokens
    D  hidden_size
    E  N + Z router width (N FFN experts, Z zero experts)
    K  moe_topk
    R  routed rows for the FFN experts
    T_real  real (non-padding) tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.model.moe.dispatcher import LocalTokenDispatcher, TokenDispatcher
from longcat.model.moe.experts import GroupedExperts
from longcat.model.moe.router import RouterOutput, TopKRouter


@dataclass
class MoEStats:
    """Router statistics of one MoE layer over the *real* tokens of one micro-batch (local shard).

    expert_counts_E: fp32 [E], detached: assignments to each expert (T_i of Eq. 2; sums to K*num_tokens).
    prob_sum_E: fp32 [E], with grad: sum over real tokens of the full softmax (P_j of Eq. 4, times T).
    num_tokens: fp32 scalar tensor, detached: real tokens (T of Eq. 3-5).
    ffn_per_token_T: fp32 [T_real], detached: FFN (non-zero) experts chosen by each real token.
    """

    expert_counts_E: torch.Tensor
    prob_sum_E: torch.Tensor
    num_tokens: torch.Tensor
    ffn_per_token_T: torch.Tensor


def router_stats(route: RouterOutput, *, num_ffn_experts: int, token_mask_T: torch.Tensor | None) -> MoEStats:
    """MoEStats from a RouterOutput; ``token_mask_T`` [T] bool (True = real token) or None (all real)."""
    probs_TE = route.probs_TE
    E = probs_TE.shape[-1]
    with torch.no_grad():
        ids_TK = route.expert_ids_TK if token_mask_T is None else route.expert_ids_TK[token_mask_T]
        expert_counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E).float()
        ffn_per_token_T = (ids_TK < num_ffn_experts).sum(dim=-1).float()
    if token_mask_T is None:
        prob_sum_E = probs_TE.sum(dim=0)
        num_tokens = torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device)
    else:
        mask_T = token_mask_T.to(probs_TE.dtype)
        prob_sum_E = (probs_TE * mask_T[:, None]).sum(dim=0)
        num_tokens = mask_T.sum()
    return MoEStats(
        expert_counts_E=expert_counts_E,
        prob_sum_E=prob_sum_E,
        num_tokens=num_tokens,
        ffn_per_token_T=ffn_per_token_T,
    )


class MoE(nn.Module):
    """Router + FFN experts + zero experts; ``mlp.router.*`` and ``mlp.experts.*`` in the checkpoint.

    Args:
        cfg: model dims (n_routed_experts N, zero_expert_num Z, moe_topk K, ...).
        dispatcher: the token dispatcher; default ``LocalTokenDispatcher`` with all N experts local.
        experts: the (local) FFN experts; default all N experts on this process.
    """

    def __init__(
        self, cfg: ModelConfig, *, dispatcher: TokenDispatcher | None = None, experts: GroupedExperts | None = None
    ) -> None:
        super().__init__()
        self.num_ffn_experts = cfg.n_routed_experts
        self.num_zero_experts = cfg.zero_expert_num
        self.router = TopKRouter(
            cfg.hidden_size,
            num_experts=cfg.num_experts_total,
            top_k=cfg.moe_topk,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        if experts is None:
            experts = GroupedExperts(
                cfg.hidden_size, intermediate_size=cfg.expert_ffn_hidden_size, num_local_experts=cfg.n_routed_experts
            )
        self.experts = experts
        self.dispatcher = LocalTokenDispatcher(cfg.n_routed_experts) if dispatcher is None else dispatcher

    def forward(
        self, u_BSD: torch.Tensor, *, token_mask_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """u_BSD [B, S, D] (the normed input shared with FFN0) -> (MoE output [B, S, D], MoEStats).

        Padding tokens (``token_mask_BS`` False) are routed and computed like real ones but are left
        out of the statistics.
        """
        B, S, D = u_BSD.shape
        u_TD = u_BSD.reshape(B * S, D)
        route = self.router(u_TD)

        dispatched = self.dispatcher.dispatch(u_TD, expert_ids_TK=route.expert_ids_TK, gates_TK=route.gates_TK)
        expert_out_RD = self.experts(dispatched.tokens_RD, counts_L=dispatched.counts_L)
        weighted_RD = (expert_out_RD * dispatched.gates_R[:, None]).to(u_TD.dtype)
        ffn_out_TD = self.dispatcher.combine(weighted_RD, handle=dispatched.handle)

        out_TD = ffn_out_TD
        if self.num_zero_experts:
            # A zero expert returns its input: its share is (sum of the token's zero-expert gates) * u.
            zero_gate_T = route.gates_TK.masked_fill(route.expert_ids_TK < self.num_ffn_experts, 0.0).sum(dim=-1)
            out_TD = out_TD + (u_TD * zero_gate_T[:, None]).to(u_TD.dtype)

        token_mask_T = None if token_mask_BS is None else token_mask_BS.reshape(B * S)
        stats = router_stats(route, num_ffn_experts=self.num_ffn_experts, token_mask_T=token_mask_T)
        return out_TD.view(B, S, D), stats
