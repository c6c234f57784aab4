"""The MoE block ``mlp`` of a decoder layer: router -> token dispatcher -> experts -> combine
(arXiv 2509.01322 §2.1, Eq. 1).

    MoE(u_t) = sum_{i in topK} g_i * E_i(u_t),   E_i(u) = u for a zero expert (id >= N)

Router statistics are *returned* (``MoEStats``), never stored on the module, so recomputation under
activation checkpointing cannot count a micro-batch twice.

The forward runs in three steps so that the ScMoE layer can overlap the token exchange with its
dense branch (docs/architecture.md): ``start`` (router, statistics, tp
split, dispatch started) -> ``run_experts`` (wait for the dispatch, grouped GEMM, combine started)
-> ``finish`` (wait for the combine, zero experts, tp gather). ``forward`` runs the three in a row.
The exchanges are labelled "dispatch" and "combine" for ``longcat.distributed.overlap``'s wait
recorder.

Under tensor parallelism (``tp_group`` of size > 1) the input is replicated over tp. The router
runs on every token on every tp rank, so MoEStats and the router's gradient are those of the whole
micro-batch and identical on all tp ranks (reduce the router's grad over dp only). Each tp rank
then dispatches its 1/tp slice of the tokens; the slice's output is all-gathered back over tp, so
the layer returns the full, replicated output (backward: the slice's grad; the input's grad is
all-gathered, hence full and identical on every tp rank).

Shape legend:
    B  batch
    S  sequence
    T  B * S tokens (the micro-batch, replicated over tp)
    t  T / tp tokens: this tp rank's slice (t = T without tp)
    D  hidden_size
    E  N + Z router width (N FFN experts, Z zero experts)
    K  moe_topk
    R  routed rows for the FFN experts
    T_real  real (non-padding) tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from longcat.config.schema import ModelConfig
from longcat.distributed.collectives import gather_from_group, split_to_group
from longcat.distributed.overlap import comm_label
from longcat.model.moe.dispatch import (
    LocalTokenDispatcher,
    PendingCombine,
    TokenDispatcher,
)
from longcat.model.moe.experts import GroupedExperts
from longcat.model.moe.router import RouterOutput, TopKRouter


@dataclass
class MoEStats:
    """Router statistics of one MoE layer over the *real* tokens of one micro-batch (local shard).

    expert_counts_E: fp32 [E], detached: assignments to each expert (T_i of Eq. 2; sums to K*num_tokens).
    prob_sum_E: fp32 [E], with grad: sum over real tokens of the full softmax (P_j of Eq. 4, times T).
    num_tokens: fp32 scalar tensor, detached: real tokens (T of Eq. 3-5).
    ffn_per_token_T: fp32 [T_real], detached: FFN (non-zero) experts chosen by each real token.
    probs_TE: fp32 [T, E], with grad: the router's full softmax over *all* T tokens (padding
        included; see ``token_mask_T``), for gradients with respect to P (R_g, Eq. 9). Holding it
        keeps a [T, E] tensor alive: drop it (``None``) before keeping stats past the backward.
    token_mask_T: bool [T] (True = real token) or None (all real).
    """

    expert_counts_E: torch.Tensor
    prob_sum_E: torch.Tensor
    num_tokens: torch.Tensor
    ffn_per_token_T: torch.Tensor
    probs_TE: torch.Tensor | None = None
    token_mask_T: torch.Tensor | None = None


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
        probs_TE=probs_TE,
        token_mask_T=token_mask_T,
    )


@dataclass
class MoEInFlight:
    """State of one MoE forward between ``MoE.start``, ``MoE.run_experts`` and ``MoE.finish``.

    shape_BSD: the input's shape. u_TD / route: the full (tp-replicated) tokens and routing.
    stats: this micro-batch's MoEStats. u_tD, expert_ids_tK, gates_tK: this tp rank's slice.
    pending: the dispatcher's pending dispatch (after ``start``) or ``PendingCombine`` (after
    ``run_experts``)."""

    shape_BSD: torch.Size
    u_TD: torch.Tensor
    route: RouterOutput
    stats: MoEStats
    u_tD: torch.Tensor
    expert_ids_tK: torch.Tensor
    gates_tK: torch.Tensor
    pending: Any


class MoE(nn.Module):
    """Router + FFN experts + zero experts; ``mlp.router.*`` and ``mlp.experts.*`` in the checkpoint.

    Args:
        cfg: model dims (n_routed_experts N, zero_expert_num Z, moe_topk K, ...).
        dispatcher: the token dispatcher; default ``LocalTokenDispatcher`` with all N experts local
            (``longcat.model.parallel.expert_parallel.apply_expert_parallel`` swaps in the all-to-all one).
        experts: the (local) FFN experts; default all N experts on this process.
        tp_group: the tp group over which the input is replicated; None (or size 1) = no split.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dispatcher: TokenDispatcher | None = None,
        experts: GroupedExperts | None = None,
        tp_group: dist.ProcessGroup | None = None,
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
        self.tp_group = tp_group

    def forward(
        self,
        u_BSD: torch.Tensor,
        *,
        token_mask_BS: torch.Tensor | None = None,
        overlap_with: Sequence[Callable[[], None]] = (),
    ) -> tuple[torch.Tensor, MoEStats]:
        """u_BSD [B, S, D] (the normed input shared with FFN0; replicated over tp) -> (MoE output
        [B, S, D], replicated over tp; MoEStats of the whole micro-batch).

        Padding tokens (``token_mask_BS`` False) are routed and computed like real ones but are left
        out of the statistics.

        ``overlap_with``: up to two callables, work independent of this MoE (the ScMoE dense
        branch), run while the dispatch and then the combine are in flight:
        ``start -> overlap_with[0]() -> run_experts -> overlap_with[1]() -> finish``.

        Raises:
            ValueError: under tp, B * S not divisible by the tp size; more than two callables.
        """
        if len(overlap_with) > 2:
            raise ValueError(f"overlap_with takes at most 2 callables (dispatch, combine), got {len(overlap_with)}")
        under_dispatch, under_combine = (*overlap_with, None, None)[:2]
        state = self.start(u_BSD, token_mask_BS=token_mask_BS)
        if under_dispatch is not None:
            under_dispatch()
        state = self.run_experts(state)
        if under_combine is not None:
            under_combine()
        return self.finish(state)

    def start(self, u_BSD: torch.Tensor, *, token_mask_BS: torch.Tensor | None = None) -> MoEInFlight:
        """Route every token, take this tp rank's slice and start the dispatch (may return while the
        exchange is in flight)."""
        B, S, D = u_BSD.shape
        u_TD = u_BSD.reshape(B * S, D)
        route = self.router(u_TD)
        token_mask_T = None if token_mask_BS is None else token_mask_BS.reshape(B * S)
        stats = router_stats(route, num_ffn_experts=self.num_ffn_experts, token_mask_T=token_mask_T)

        u_tD, expert_ids_tK, gates_tK = u_TD, route.expert_ids_TK, route.gates_TK
        if self.tp_group is not None and self.tp_group.size() > 1:
            # Each tp rank holds the same T tokens; it dispatches only its T/tp slice.
            u_tD = split_to_group(u_TD, dim=0, group=self.tp_group)
            gates_tK = split_to_group(route.gates_TK, dim=0, group=self.tp_group)
            expert_ids_tK = route.expert_ids_TK.chunk(self.tp_group.size())[self.tp_group.rank()]
        with comm_label("dispatch"):
            pending = self.dispatcher.dispatch_start(u_tD, expert_ids_TK=expert_ids_tK, gates_TK=gates_tK)
        return MoEInFlight(u_BSD.shape, u_TD, route, stats, u_tD, expert_ids_tK, gates_tK, pending)

    def run_experts(self, state: MoEInFlight) -> MoEInFlight:
        """Wait for the dispatch, run the grouped GEMM and start the combine (per chunk, pipelined,
        with a chunked dispatcher)."""
        with comm_label("combine"):
            state.pending = self.dispatcher.run_experts(state.pending, experts=self.experts)
        return state

    def finish(self, state: MoEInFlight) -> tuple[torch.Tensor, MoEStats]:
        """Wait for the combine, add the zero experts' share, gather over tp -> ([B, S, D], MoEStats)."""
        assert isinstance(state.pending, PendingCombine), "call run_experts between start and finish"
        out_tD = self.dispatcher.combine_wait(state.pending)
        if self.num_zero_experts:
            # A zero expert returns its input: its share is (sum of the token's zero-expert gates) * u,
            # formed here, on the token's own rank (zero experts never travel).
            is_ffn_tK = state.expert_ids_tK < self.num_ffn_experts
            zero_gate_t = state.gates_tK.masked_fill(is_ffn_tK, 0.0).sum(dim=-1)
            out_tD = out_tD + (state.u_tD * zero_gate_t[:, None]).to(state.u_tD.dtype)
        out_TD = out_tD
        if self.tp_group is not None and self.tp_group.size() > 1:
            # [T/tp, D] this rank's slice -> all_gather(tp) -> [T, D] replicated; backward: slice
            out_TD = gather_from_group(out_tD, dim=0, group=self.tp_group)
        return out_TD.view(state.shape_BSD), state.stats
